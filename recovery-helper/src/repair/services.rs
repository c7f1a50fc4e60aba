//! Hypervisor tools off, cloud-init on, stale device caches gone.
//!
//! Units are disabled and masked by editing the guest's `/etc/systemd/system` directly (what
//! `systemctl disable` + `mask` do), so nothing of the guest runs and nothing needs the network.

use super::{Ctx, Error, StepReport};

/// Agents of other hypervisors: useless on KVM, some of them noisy or harmful there.
pub const HYPERVISOR_UNITS: &[&str] = &[
    "open-vm-tools.service",
    "vmtoolsd.service",
    "vgauth.service",
    "vgauthd.service",
    "vmware-tools.service",
    "vmware-tools-thinprint.service",
    "run-vmblock\\x2dfuse.mount",
    "hv-kvp-daemon.service",
    "hv-vss-daemon.service",
    "hv-fcopy-daemon.service",
    "hypervkvpd.service",
    "hypervvssd.service",
    "hypervfcopyd.service",
    "xe-linux-distribution.service",
    "xe-daemon.service",
];

/// SysV init scripts of the same agents.
const HYPERVISOR_INIT_SCRIPTS: &[&str] = &["vmware-tools", "open-vm-tools", "xe-linux-distribution"];

const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Files that remember devices of the old machine.
pub const STALE_CACHES: &[&str] = &[
    "/etc/lvm/devices/system.devices",
    "/etc/lvm/cache/.cache",
    "/etc/blkid.tab",
    "/etc/blkid.tab.old",
    "/etc/blkid/blkid.tab",
    "/etc/blkid/blkid.tab.old",
];

/// The `WantedBy=`/`RequiredBy=` targets of a unit file.
pub fn install_targets(unit: &str) -> Vec<(String, &'static str)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            section = if l == "[Install]" { "install" } else { "" };
            continue;
        }
        if section != "install" {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            let kind = match k.trim() {
                "WantedBy" => "wants",
                "RequiredBy" => "requires",
                _ => continue,
            };
            out.extend(v.split_whitespace().map(|t| (t.to_owned(), kind)));
        }
    }
    out
}

/// Where a unit's file is (a vendor or admin unit, not a mask).
fn unit_file(ctx: &Ctx<'_>, unit: &str) -> Result<Option<String>, Error> {
    for dir in UNIT_DIRS {
        let path = format!("{dir}/{unit}");
        if ctx
            .fs
            .read_link(&path)?
            .is_some_and(|t| t.as_os_str() == "/dev/null")
        {
            continue;
        }
        if ctx.fs.read(&path)?.is_some() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn is_masked(ctx: &Ctx<'_>, unit: &str) -> Result<bool, Error> {
    Ok(ctx
        .fs
        .read_link(&format!("/etc/systemd/system/{unit}"))?
        .is_some_and(|t| t.as_os_str() == "/dev/null"))
}

/// The step that disables other hypervisors' agents.
pub fn hypervisor_tools(ctx: &mut Ctx<'_>) -> Result<StepReport, Error> {
    let mut report = StepReport::new("hypervisor-tools");
    let wants_dirs: Vec<String> = ctx
        .fs
        .list("/etc/systemd/system")?
        .into_iter()
        .filter(|n| n.ends_with(".wants") || n.ends_with(".requires"))
        .map(|n| format!("/etc/systemd/system/{n}"))
        .collect();
    for unit in HYPERVISOR_UNITS {
        let present = unit_file(ctx, unit)?.is_some() || is_masked(ctx, unit)?;
        if !present {
            continue;
        }
        for dir in &wants_dirs {
            let link = format!("{dir}/{unit}");
            if ctx.fs.read_link(&link)?.is_some() && ctx.fs.remove(&link)? {
                report.act(format!("{unit}: disabled ({link} removed)"));
            }
        }
        if ctx
            .fs
            .symlink(&format!("/etc/systemd/system/{unit}"), "/dev/null")?
        {
            report.act(format!("{unit}: masked"));
        }
    }
    for script in HYPERVISOR_INIT_SCRIPTS {
        if ctx.fs.read(&format!("/etc/init.d/{script}"))?.is_none() {
            continue;
        }
        for level in [
            "rc0.d", "rc1.d", "rc2.d", "rc3.d", "rc4.d", "rc5.d", "rc6.d", "rcS.d",
        ] {
            for name in ctx.fs.list(&format!("/etc/{level}"))? {
                if name.starts_with('S')
                    && name.trim_start_matches(|c: char| c == 'S' || c.is_ascii_digit()) == *script
                {
                    let path = format!("/etc/{level}/{name}");
                    if ctx.fs.remove(&path)? {
                        report.act(format!("{script}: SysV start link {path} removed"));
                    }
                }
            }
        }
    }
    if !report.changed {
        report.note("no enabled hypervisor agent found".to_owned());
    }
    Ok(report)
}

/// The step that (re-)enables cloud-init when the guest has it.
pub fn cloud_init(ctx: &mut Ctx<'_>) -> Result<StepReport, Error> {
    let mut report = StepReport::new("cloud-init");
    let units: Vec<String> = UNIT_DIRS[1..]
        .iter()
        .map(|d| ctx.fs.list(d))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .filter(|n| {
            (n.starts_with("cloud-init") || n.starts_with("cloud-config") || n.starts_with("cloud-final"))
                && (n.ends_with(".service") || n.ends_with(".target"))
        })
        .collect();
    if units.is_empty() {
        report.note("cloud-init is not installed".to_owned());
        return Ok(report);
    }
    if ctx.fs.remove("/etc/cloud/cloud-init.disabled")? {
        report.act("/etc/cloud/cloud-init.disabled removed".to_owned());
    }
    let mut units = units;
    units.sort();
    units.dedup();
    for unit in &units {
        let mask = format!("/etc/systemd/system/{unit}");
        if is_masked(ctx, unit)? && ctx.fs.remove(&mask)? {
            report.act(format!("{unit}: unmasked"));
        }
        let Some(path) = unit_file(ctx, unit)? else {
            continue;
        };
        let text = ctx.fs.read(&path)?.unwrap_or_default();
        for (target, kind) in install_targets(&text) {
            let link = format!("/etc/systemd/system/{target}.{kind}/{unit}");
            if ctx.fs.read_link(&link)?.is_none() && ctx.fs.symlink(&link, &path)? {
                report.act(format!("{unit}: enabled ({link})"));
            }
        }
    }
    Ok(report)
}

/// The step that removes stale device caches.
pub fn caches(ctx: &mut Ctx<'_>) -> Result<StepReport, Error> {
    let mut report = StepReport::new("device-caches");
    for path in STALE_CACHES {
        if ctx.fs.remove(path)? {
            report.act(format!("{path}: removed"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_section() {
        let t = "[Unit]\nWantedBy=nope\n[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target cloud-init.target\nRequiredBy=foo.target\nAlias=x.service\n";
        assert_eq!(
            install_targets(t),
            vec![
                ("multi-user.target".to_owned(), "wants"),
                ("cloud-init.target".to_owned(), "wants"),
                ("foo.target".to_owned(), "requires")
            ]
        );
        assert!(install_targets("[Unit]\n").is_empty());
    }
}

//! virtio drivers in the initramfs of every installed kernel, built by the guest's own tool in a
//! chroot: initramfs-tools, dracut, mkinitcpio or SUSE's old mkinitrd.
//!
//! An initramfs is rebuilt only when it lacks a driver (or the kernel has it built in), so a
//! second run rebuilds nothing. Two traps of building in a chroot are avoided: initramfs-tools'
//! `MODULES=dep` and dracut's host-only mode would both look at the *helper's* hardware, so the
//! former is switched to `MODULES=most` and dracut runs with `--no-hostonly`.

use super::{Ctx, Error, StepReport};

/// The drivers a KVM guest needs to find its disks and its network.
pub const VIRTIO_DRIVERS: &[&str] = &["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"];

/// The initramfs generators the repair drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Debian/Ubuntu `update-initramfs`.
    InitramfsTools,
    /// dracut (RHEL, SUSE, and Debian when installed).
    Dracut,
    /// Arch `mkinitcpio`.
    Mkinitcpio,
    /// SUSE's old `mkinitrd`.
    SuseMkinitrd,
}

fn detect(ctx: &Ctx<'_>) -> Result<Option<Tool>, Error> {
    let has = |p: &str| ctx.fs.exists(p);
    Ok(
        if has("/usr/bin/dracut")? || has("/sbin/dracut")? || has("/usr/sbin/dracut")? {
            Some(Tool::Dracut)
        } else if has("/usr/sbin/update-initramfs")? || has("/sbin/update-initramfs")? {
            Some(Tool::InitramfsTools)
        } else if has("/usr/bin/mkinitcpio")? {
            Some(Tool::Mkinitcpio)
        } else if has("/sbin/mkinitrd")? || has("/usr/sbin/mkinitrd")? {
            Some(Tool::SuseMkinitrd)
        } else {
            None
        },
    )
}

/// Installed kernels: module trees with a kernel image in /boot.
fn kernels(ctx: &Ctx<'_>) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for k in ctx.fs.list("/lib/modules")? {
        let has_image = ctx.fs.exists(&format!("/boot/vmlinuz-{k}"))?
            || ctx.fs.exists(&format!("/lib/modules/{k}/vmlinuz"))?
            || ctx.fs.exists(&format!("/boot/vmlinuz-{k}.img"))?;
        if has_image {
            out.push(k);
        }
    }
    Ok(out)
}

/// The initramfs image of kernel `k` for a tool, as the guest names it.
fn image_of(ctx: &Ctx<'_>, tool: Tool, k: &str) -> Result<String, Error> {
    let candidates = [
        format!("/boot/initrd.img-{k}"),
        format!("/boot/initramfs-{k}.img"),
        format!("/boot/initrd-{k}"),
    ];
    for c in &candidates {
        if ctx.fs.exists(c)? {
            return Ok(c.clone());
        }
    }
    Ok(match tool {
        Tool::InitramfsTools => candidates[0].clone(),
        Tool::Dracut if ctx.os.family == Some(super::guest::Family::Debian) => candidates[0].clone(),
        Tool::SuseMkinitrd => candidates[2].clone(),
        _ => candidates[1].clone(),
    })
}

/// Drivers of `wanted` that kernel `k` builds in.
fn builtin(ctx: &Ctx<'_>, k: &str) -> Result<Vec<String>, Error> {
    let text = ctx
        .fs
        .read(&format!("/lib/modules/{k}/modules.builtin"))?
        .unwrap_or_default();
    Ok(VIRTIO_DRIVERS
        .iter()
        .filter(|d| text.lines().any(|l| l.ends_with(&format!("/{d}.ko"))))
        .map(|d| (*d).to_owned())
        .collect())
}

/// Drivers missing from an initramfs (given its file list).
pub fn missing_from(listing: &str, builtin: &[String]) -> Vec<&'static str> {
    VIRTIO_DRIVERS
        .iter()
        .copied()
        .filter(|d| !builtin.iter().any(|b| b == d))
        .filter(|d| {
            !listing.lines().any(|l| {
                let name = l.rsplit('/').next().unwrap_or("");
                let stem = name.split(".ko").next().unwrap_or("");
                name.contains(".ko") && stem.replace('-', "_") == *d
            })
        })
        .collect()
}

fn list_image(ctx: &Ctx<'_>, tool: Tool, image: &str) -> Result<Option<String>, Error> {
    if !ctx.fs.exists(image)? {
        return Ok(None);
    }
    let lister: &[&str] = match tool {
        Tool::InitramfsTools => &["lsinitramfs"],
        Tool::Dracut | Tool::SuseMkinitrd => &["lsinitrd"],
        Tool::Mkinitcpio => &["lsinitcpio"],
    };
    let out = ctx.chroot(&[lister[0], image])?;
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Appends missing module names to a one-module-per-line file. Returns the new text.
pub fn add_module_lines(text: &str, modules: &[&str]) -> Option<String> {
    let have: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&&str> = modules.iter().filter(|m| !have.contains(m)).collect();
    if missing.is_empty() {
        return None;
    }
    let mut out = text.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("# Added by tern-repair: virtio drivers for KVM\n");
    for m in missing {
        out.push_str(m);
        out.push('\n');
    }
    Some(out)
}

/// Rewrites `MODULES=dep` (which, in a chroot, would look at the helper's hardware) to
/// `MODULES=most`.
pub fn no_modules_dep(text: &str) -> Option<String> {
    let mut changed = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|l| {
            let t = l.trim();
            if t == "MODULES=dep" || t == "MODULES=\"dep\"" {
                changed = true;
                "# tern-repair: was MODULES=dep (it would probe the helper's hardware in a chroot)\nMODULES=most\n".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    changed.then_some(out)
}

/// Removes virtio drivers from `omit_drivers` assignments in a dracut configuration file.
pub fn dracut_unomit(text: &str) -> Option<String> {
    let mut changed = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|l| {
            let t = l.trim_start();
            let Some(rest) = t.strip_prefix("omit_drivers") else {
                return l.to_owned();
            };
            let Some((op, value)) = rest.split_once('=') else {
                return l.to_owned();
            };
            let quote = if value.trim_start().starts_with('\'') {
                '\''
            } else {
                '"'
            };
            let inner = value.trim().trim_matches(|c| c == '"' || c == '\'');
            let kept: Vec<&str> = inner
                .split_whitespace()
                .filter(|w| !w.starts_with("virtio"))
                .collect();
            if kept.len() == inner.split_whitespace().count() {
                return l.to_owned();
            }
            changed = true;
            format!("omit_drivers{op}={quote} {} {quote}\n", kept.join(" "))
        })
        .collect();
    changed.then_some(out)
}

/// Adds the virtio modules to mkinitcpio's `MODULES=(...)`.
pub fn mkinitcpio_modules(text: &str) -> Option<String> {
    let mut changed = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|l| {
            let Some(inner) = l
                .trim()
                .strip_prefix("MODULES=(")
                .and_then(|r| r.strip_suffix(')'))
            else {
                return l.to_owned();
            };
            let mut mods: Vec<&str> = inner.split_whitespace().collect();
            let before = mods.len();
            for d in VIRTIO_DRIVERS {
                if !mods.contains(d) {
                    mods.push(d);
                }
            }
            if mods.len() == before {
                return l.to_owned();
            }
            changed = true;
            format!("MODULES=({})\n", mods.join(" "))
        })
        .collect();
    changed.then_some(out)
}

/// The step.
pub fn run(ctx: &mut Ctx<'_>) -> Result<StepReport, Error> {
    let mut report = StepReport::new("virtio-initramfs");
    let Some(tool) = detect(ctx)? else {
        return Err(Error::Refused(
            "the guest has no initramfs generator the repair knows (initramfs-tools, dracut, mkinitcpio, mkinitrd)".to_owned(),
        ));
    };
    let kernels = kernels(ctx)?;
    if kernels.is_empty() {
        return Err(Error::Refused(
            "the guest has no installed kernel (no /lib/modules/K with /boot/vmlinuz-K)".to_owned(),
        ));
    }
    let mut todo = Vec::new();
    for k in &kernels {
        let image = image_of(ctx, tool, k)?;
        let built_in = builtin(ctx, k)?;
        let missing: Vec<&str> = match list_image(ctx, tool, &image)? {
            Some(listing) => missing_from(&listing, &built_in),
            None => VIRTIO_DRIVERS.to_vec(),
        };
        if missing.is_empty() {
            report.note(format!("{image}: has the virtio drivers"));
        } else {
            todo.push((k.clone(), image, missing));
        }
    }
    if todo.is_empty() {
        return Ok(report);
    }
    // Configure the tool so that later kernel updates keep the drivers too.
    match tool {
        Tool::InitramfsTools => {
            let path = "/etc/initramfs-tools/modules";
            let text = ctx.fs.read(path)?.unwrap_or_default();
            if let Some(new) = add_module_lines(&text, VIRTIO_DRIVERS) {
                ctx.fs.write(path, &new, 0o644)?;
                report.act(format!("{path}: added {}", VIRTIO_DRIVERS.join(" ")));
            }
            let mut confs = vec!["/etc/initramfs-tools/initramfs.conf".to_owned()];
            confs.extend(
                ctx.fs
                    .list("/etc/initramfs-tools/conf.d")?
                    .into_iter()
                    .map(|n| format!("/etc/initramfs-tools/conf.d/{n}")),
            );
            for c in confs {
                if let Some(new) = ctx.fs.read(&c)?.as_deref().and_then(no_modules_dep) {
                    ctx.fs.write(&c, &new, 0o644)?;
                    report.act(format!("{c}: MODULES=dep → MODULES=most"));
                }
            }
        }
        Tool::Dracut => {
            let mut confs = vec!["/etc/dracut.conf".to_owned()];
            confs.extend(
                ctx.fs
                    .list("/etc/dracut.conf.d")?
                    .into_iter()
                    .filter(|n| n.ends_with(".conf"))
                    .map(|n| format!("/etc/dracut.conf.d/{n}")),
            );
            for c in confs {
                if let Some(new) = ctx.fs.read(&c)?.as_deref().and_then(dracut_unomit) {
                    ctx.fs.write(&c, &new, 0o644)?;
                    report.act(format!("{c}: virtio drivers no longer omitted"));
                }
            }
            let path = "/etc/dracut.conf.d/90-tern-virtio.conf";
            let conf = format!(
                "# Written by tern-repair: virtio drivers for KVM\nadd_drivers+=\" {} \"\n",
                VIRTIO_DRIVERS.join(" ")
            );
            if ctx.fs.write(path, &conf, 0o644)? {
                report.act(format!("{path}: add_drivers {}", VIRTIO_DRIVERS.join(" ")));
            }
        }
        Tool::Mkinitcpio => {
            let path = "/etc/mkinitcpio.conf";
            if let Some(new) = ctx.fs.read(path)?.as_deref().and_then(mkinitcpio_modules) {
                ctx.fs.write(path, &new, 0o644)?;
                report.act(format!("{path}: MODULES += {}", VIRTIO_DRIVERS.join(" ")));
            }
        }
        Tool::SuseMkinitrd => {
            let path = "/etc/sysconfig/kernel";
            if let Some(text) = ctx.fs.read(path)? {
                let new: String = text
                    .split_inclusive('\n')
                    .map(|l| {
                        match l
                            .trim()
                            .strip_prefix("INITRD_MODULES=\"")
                            .and_then(|r| r.strip_suffix('"'))
                        {
                            Some(inner) => {
                                let mut m: Vec<&str> = inner.split_whitespace().collect();
                                for d in VIRTIO_DRIVERS {
                                    if !m.contains(d) {
                                        m.push(d);
                                    }
                                }
                                format!("INITRD_MODULES=\"{}\"\n", m.join(" "))
                            }
                            None => l.to_owned(),
                        }
                    })
                    .collect();
                if ctx.fs.write(path, &new, 0o644)? {
                    report.act(format!("{path}: INITRD_MODULES += {}", VIRTIO_DRIVERS.join(" ")));
                }
            }
        }
    }
    for (k, image, missing) in &todo {
        let drivers = VIRTIO_DRIVERS.join(" ");
        let args: Vec<&str> = match tool {
            Tool::InitramfsTools => {
                if ctx.fs.exists(image)? {
                    vec!["update-initramfs", "-u", "-k", k]
                } else {
                    vec!["update-initramfs", "-c", "-k", k]
                }
            }
            Tool::Dracut => vec![
                "dracut",
                "--force",
                "--no-hostonly",
                "--add-drivers",
                &drivers,
                "--kver",
                k,
                image,
            ],
            Tool::Mkinitcpio => vec!["mkinitcpio", "-P"],
            Tool::SuseMkinitrd => vec!["mkinitrd", "-k", "vmlinuz", "-i", "initrd"],
        };
        ctx.chroot(&args)?;
        let listing = list_image(ctx, tool, image)?.unwrap_or_default();
        let still = missing_from(&listing, &builtin(ctx, k)?);
        if !still.is_empty() {
            return Err(Error::Check(format!(
                "{image} still lacks {} after `{}` in the guest",
                still.join(" "),
                args.join(" ")
            )));
        }
        report.act(format!(
            "{image}: rebuilt with `{}` (added {})",
            args.join(" "),
            missing.join(" ")
        ));
        if matches!(tool, Tool::Mkinitcpio | Tool::SuseMkinitrd) {
            break; // these rebuild every kernel at once
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing() {
        let l = "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/block/virtio_blk.ko\nusr/lib/modules/6.1.0-28-amd64/kernel/drivers/net/virtio_net.ko.xz\nusr/lib/modules/x/kernel/drivers/virtio/virtio_pci.ko.zst\n";
        assert_eq!(missing_from(l, &[]), vec!["virtio_scsi"]);
        assert!(missing_from(l, &["virtio_scsi".to_owned()]).is_empty());
        assert_eq!(missing_from("", &[]).len(), 4);
        assert_eq!(missing_from("virtio_blk.conf\n", &[]).len(), 4);
    }

    #[test]
    fn modules_file() {
        let t = "# List of modules\nahci\nsd_mod # disks\n";
        let new = add_module_lines(t, VIRTIO_DRIVERS).unwrap();
        assert!(new.ends_with("virtio_pci\nvirtio_blk\nvirtio_scsi\nvirtio_net\n"));
        assert!(add_module_lines(&new, VIRTIO_DRIVERS).is_none());
        assert_eq!(
            add_module_lines("virtio_pci", &["virtio_pci", "virtio_net"]).unwrap(),
            "virtio_pci\n# Added by tern-repair: virtio drivers for KVM\nvirtio_net\n"
        );
    }

    #[test]
    fn modules_dep() {
        assert!(no_modules_dep("MODULES=most\n").is_none());
        let out = no_modules_dep("BUSYBOX=auto\nMODULES=dep\n").unwrap();
        assert!(out.ends_with("MODULES=most\n"));
        assert!(no_modules_dep(&out).is_none());
    }

    #[test]
    fn dracut_omit() {
        let out =
            dracut_unomit("hostonly=\"yes\"\nomit_drivers+=\" virtio_blk floppy virtio_net \"\n").unwrap();
        assert_eq!(out, "hostonly=\"yes\"\nomit_drivers+=\" floppy \"\n");
        assert!(dracut_unomit(&out).is_none());
    }

    #[test]
    fn mkinitcpio() {
        let out = mkinitcpio_modules("MODULES=(ext4)\nHOOKS=(base)\n").unwrap();
        assert_eq!(
            out,
            "MODULES=(ext4 virtio_pci virtio_blk virtio_scsi virtio_net)\nHOOKS=(base)\n"
        );
        assert!(mkinitcpio_modules(&out).is_none());
    }
}

//! Network: static addresses become DHCP, independent of NIC names.
//!
//! A VMware guest names its NIC `ens192`; on KVM the same NIC is `ens3`, `ens4`, `enp0s3`,
//! `enp1s0` or `eth0`. So each converted configuration matches NICs by pattern, not by the old
//! name: ifupdown maps the first NIC matching `e*` onto the old logical name
//! (`auto /e*/1=ens192`), netplan and systemd-networkd match `e*`, NetworkManager profiles drop
//! their interface binding, RHEL ifcfg files drop `DEVICE`/`HWADDR`.
//!
//! With [`NetworkMode::KeepStatic`] the static configuration stays and udev rules pin the old
//! NIC names to the new MAC addresses instead. Stale `70-persistent-net.rules` are removed in
//! both modes.

use super::{Ctx, Error, NetworkMode, StepReport};

const ADDRESSING: &[&str] = &[
    "address",
    "netmask",
    "gateway",
    "broadcast",
    "network",
    "pointopoint",
    "dns-nameservers",
    "dns-search",
    "dns-domain",
    "hwaddress",
];

fn stanza_start(word: &str) -> bool {
    matches!(
        word,
        "iface"
            | "mapping"
            | "auto"
            | "source"
            | "source-directory"
            | "rename"
            | "no-auto-down"
            | "no-scripts"
    ) || word.starts_with("allow-")
}

/// ifupdown: converts `iface NAME inet static` stanzas to DHCP on the n-th NIC matching `e*`.
/// `None` when there is nothing static.
pub fn ifupdown_to_dhcp(text: &str) -> Option<(String, Vec<String>)> {
    let mut statics: Vec<String> = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() >= 4
            && w[0] == "iface"
            && w[2] == "inet"
            && w[3] == "static"
            && w[1] != "lo"
            && !statics.contains(&w[1].to_owned())
        {
            statics.push(w[1].to_owned());
        }
    }
    if statics.is_empty() {
        return None;
    }
    let mut out = String::new();
    let mut changes = Vec::new();
    // Whether the option lines of the current stanza are being filtered.
    let mut filtering = false;
    for line in text.split_inclusive('\n') {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = w.first() else {
            out.push_str(line);
            continue;
        };
        if first.starts_with('#') {
            out.push_str(line);
            continue;
        }
        if stanza_start(first) {
            filtering = false;
            if (*first == "auto" || first.starts_with("allow-")) && w.len() > 1 {
                let kept: Vec<&str> = w[1..]
                    .iter()
                    .copied()
                    .filter(|n| !statics.iter().any(|s| s == n))
                    .collect();
                if kept.len() != w.len() - 1 {
                    if !kept.is_empty() {
                        out.push_str(&format!("{} {}\n", first, kept.join(" ")));
                    }
                    continue;
                }
            }
            if *first == "iface" && w.len() >= 4 && statics.iter().any(|s| s == w[1]) {
                let name = w[1];
                let index = statics.iter().position(|s| s == name).unwrap_or(0) + 1;
                match (w[2], w[3]) {
                    ("inet", "static") => {
                        out.push_str(&format!(
                            "# tern-repair: was \"iface {name} inet static\"; DHCP on NIC number {index} named e* (NIC names differ on the new hypervisor)\nauto /e*/{index}={name}\niface {name} inet dhcp\n"
                        ));
                        changes.push(format!(
                            "{name}: static → DHCP on the NIC number {index} matching e*"
                        ));
                        filtering = true;
                        continue;
                    }
                    ("inet6", "static") => {
                        out.push_str(&format!("iface {name} inet6 auto\n"));
                        changes.push(format!("{name}: static IPv6 → SLAAC"));
                        filtering = true;
                        continue;
                    }
                    _ => {}
                }
            }
            out.push_str(line);
            continue;
        }
        if filtering && ADDRESSING.contains(first) {
            continue;
        }
        out.push_str(line);
    }
    Some((out, changes))
}

/// systemd-networkd: whether a `.network` file configures static addresses.
pub fn networkd_is_static(text: &str) -> bool {
    let mut section = String::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.to_owned();
            continue;
        }
        let key = l.split('=').next().unwrap_or("").trim();
        if (section == "[Network]" && (key == "Address" || key == "Gateway"))
            || (section == "[Address]" && key == "Address")
        {
            return true;
        }
    }
    false
}

/// The systemd-networkd file that replaces a static one.
pub const NETWORKD_DHCP: &str = "# Written by tern-repair: DHCP on every Ethernet NIC, whatever its name\n# (the static original is in /var/backups/tern-repair/).\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n";

/// netplan: whether a file sets static addresses.
pub fn netplan_is_static(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim_start();
        !t.starts_with('#')
            && (t.starts_with("addresses:") || t.starts_with("gateway4:") || t.starts_with("routes:"))
    })
}

/// The netplan file written instead of static ones; `renderer` as the guest had it.
pub fn netplan_dhcp(renderer: Option<&str>) -> String {
    let mut s = String::from(
        "# Written by tern-repair: DHCP on every Ethernet NIC, whatever its name\n# (the static originals are in /var/backups/tern-repair/).\nnetwork:\n  version: 2\n",
    );
    if let Some(r) = renderer {
        s.push_str(&format!("  renderer: {r}\n"));
    }
    s.push_str(
        "  ethernets:\n    tern-any-ethernet:\n      match:\n        name: \"e*\"\n      dhcp4: true\n",
    );
    s
}

/// The `renderer:` of a netplan file.
pub fn netplan_renderer(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("renderer:")
            .map(|r| r.trim().trim_matches('"').trim_matches('\'').to_owned())
            .filter(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric()))
    })
}

/// NetworkManager keyfile: a manual IPv4 Ethernet profile becomes `method=auto` and loses its
/// binding to an interface name or MAC. `None` when not applicable.
pub fn nm_keyfile_to_dhcp(text: &str) -> Option<String> {
    let mut section = String::new();
    let mut ethernet = false;
    let mut manual = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.to_owned();
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            let (k, v) = (k.trim(), v.trim());
            if section == "[connection]" && k == "type" && (v == "ethernet" || v == "802-3-ethernet") {
                ethernet = true;
            }
            if section == "[ipv4]" && k == "method" && v == "manual" {
                manual = true;
            }
        }
    }
    if !(ethernet && manual) {
        return None;
    }
    let mut out = String::new();
    section.clear();
    for line in text.split_inclusive('\n') {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.to_owned();
            out.push_str(line);
            continue;
        }
        let key = l.split('=').next().unwrap_or("").trim();
        let drop = match section.as_str() {
            "[connection]" => key == "interface-name",
            "[ethernet]" | "[802-3-ethernet]" => key == "mac-address",
            "[ipv4]" => {
                key.starts_with("address")
                    || key == "gateway"
                    || key == "dns"
                    || key == "dns-search"
                    || key.starts_with("route")
            }
            _ => false,
        };
        if drop {
            continue;
        }
        if section == "[ipv4]" && key == "method" {
            out.push_str("method=auto\n");
            continue;
        }
        out.push_str(line);
    }
    Some(out)
}

/// RHEL/SUSE ifcfg: static → DHCP, not bound to a device name or MAC. `None` when not static.
pub fn ifcfg_to_dhcp(text: &str) -> Option<String> {
    let value = |k: &str| {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(k)
                .and_then(|r| r.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_ascii_lowercase())
        })
    };
    let proto = value("BOOTPROTO").unwrap_or_default();
    let has_ip = text.lines().any(|l| l.trim_start().starts_with("IPADDR"));
    if !(matches!(proto.as_str(), "none" | "static" | "") && has_ip) {
        return None;
    }
    let mut out = String::from("# tern-repair: static → DHCP, not bound to a NIC name or MAC\n");
    let mut wrote_proto = false;
    for line in text.split_inclusive('\n') {
        let key = line.trim().split('=').next().unwrap_or("").trim();
        let drop = [
            "IPADDR",
            "NETMASK",
            "PREFIX",
            "GATEWAY",
            "NETWORK",
            "BROADCAST",
            "HWADDR",
            "MACADDR",
            "DEVICE",
        ]
        .iter()
        .any(|p| key.starts_with(p));
        if drop {
            continue;
        }
        if key == "BOOTPROTO" {
            out.push_str("BOOTPROTO=dhcp\n");
            wrote_proto = true;
            continue;
        }
        out.push_str(line);
    }
    if !wrote_proto {
        out.push_str("BOOTPROTO=dhcp\n");
    }
    Some(out)
}

/// udev rules that give NICs their old names by MAC address.
pub fn pin_rules(pins: &[(String, String)]) -> String {
    let mut s = String::from(
        "# Written by tern-repair: the NIC names the static configuration expects, by MAC address.\n",
    );
    for (name, mac) in pins {
        s.push_str(&format!(
            "SUBSYSTEM==\"net\", ACTION==\"add\", ATTR{{address}}==\"{}\", NAME=\"{name}\"\n",
            mac.to_ascii_lowercase()
        ));
    }
    s
}

/// The step.
pub fn run(ctx: &mut Ctx<'_>) -> Result<StepReport, Error> {
    let mut report = StepReport::new("network");
    for stale in [
        "/etc/udev/rules.d/70-persistent-net.rules",
        "/etc/udev/rules.d/75-persistent-net-generator.rules",
    ] {
        if ctx.fs.remove(stale)? {
            report.act(format!(
                "{stale}: removed (stale NIC names from the old hypervisor)"
            ));
        }
    }
    if let NetworkMode::KeepStatic { pins } = &ctx.opts.network {
        let path = "/etc/udev/rules.d/70-tern-nic-names.rules";
        if !pins.is_empty() && ctx.fs.write(path, &pin_rules(pins), 0o644)? {
            report.act(format!("{path}: NIC names pinned by MAC ({} NICs)", pins.len()));
        }
        report.note("static addresses kept, as asked".to_owned());
        return Ok(report);
    }
    // ifupdown, including files it sources.
    let mut ifupdown_files = vec!["/etc/network/interfaces".to_owned()];
    for name in ctx.fs.list("/etc/network/interfaces.d")? {
        if !name.starts_with('.') {
            ifupdown_files.push(format!("/etc/network/interfaces.d/{name}"));
        }
    }
    for path in ifupdown_files {
        if let Some(text) = ctx.fs.read(&path)?
            && let Some((new, changes)) = ifupdown_to_dhcp(&text)
            && ctx.fs.write(&path, &new, 0o644)?
        {
            for c in changes {
                report.act(format!("{path}: {c}"));
            }
        }
    }
    // netplan.
    let mut renderer = None;
    let mut removed_netplan = false;
    for name in ctx.fs.list("/etc/netplan")? {
        let path = format!("/etc/netplan/{name}");
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) || name == "01-tern-dhcp.yaml" {
            continue;
        }
        if let Some(text) = ctx.fs.read(&path)?
            && netplan_is_static(&text)
        {
            renderer = renderer.or_else(|| netplan_renderer(&text));
            ctx.fs.remove(&path)?;
            report.act(format!(
                "{path}: static netplan configuration set aside (backed up)"
            ));
            removed_netplan = true;
        }
    }
    if removed_netplan {
        let path = "/etc/netplan/01-tern-dhcp.yaml";
        if ctx.fs.write(path, &netplan_dhcp(renderer.as_deref()), 0o600)? {
            report.act(format!("{path}: DHCP on every NIC matching e*"));
        }
    }
    // systemd-networkd.
    for name in ctx.fs.list("/etc/systemd/network")? {
        if !name.ends_with(".network") {
            continue;
        }
        let path = format!("/etc/systemd/network/{name}");
        if let Some(text) = ctx.fs.read(&path)?
            && networkd_is_static(&text)
            && ctx.fs.write(&path, NETWORKD_DHCP, 0o644)?
        {
            report.act(format!("{path}: static → DHCP on every NIC matching en* eth*"));
        }
    }
    // NetworkManager keyfiles.
    for name in ctx.fs.list("/etc/NetworkManager/system-connections")? {
        let path = format!("/etc/NetworkManager/system-connections/{name}");
        if let Some(text) = ctx.fs.read(&path)?
            && let Some(new) = nm_keyfile_to_dhcp(&text)
            && ctx.fs.write(&path, &new, 0o600)?
        {
            report.act(format!(
                "{path}: manual IPv4 → auto (DHCP), not bound to a NIC name or MAC"
            ));
        }
    }
    // RHEL and SUSE ifcfg.
    for dir in ["/etc/sysconfig/network-scripts", "/etc/sysconfig/network"] {
        for name in ctx.fs.list(dir)? {
            if !name.starts_with("ifcfg-") || name == "ifcfg-lo" {
                continue;
            }
            let path = format!("{dir}/{name}");
            if let Some(text) = ctx.fs.read(&path)?
                && let Some(new) = ifcfg_to_dhcp(&text)
                && ctx.fs.write(&path, &new, 0o644)?
            {
                report.act(format!("{path}: static → DHCP, not bound to a NIC name or MAC"));
            }
        }
    }
    if !report.changed {
        report.note("no static network configuration found".to_owned());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n# The primary network interface\nallow-hotplug ens192\niface ens192 inet static\n\taddress 192.168.50.10/24\n\tgateway 192.168.50.1\n\tdns-nameservers 192.168.50.1\n\tmtu 1500\n\nauto ens224 lo2\niface ens224 inet static\n    address 10.9.9.9\n    netmask 255.255.255.0\niface ens224 inet6 static\n    address fd00::9/64\n";

    #[test]
    fn ifupdown() {
        let (out, changes) = ifupdown_to_dhcp(DEBIAN).unwrap();
        assert!(
            out.contains("auto /e*/1=ens192\niface ens192 inet dhcp\n"),
            "{out}"
        );
        assert!(out.contains("auto /e*/2=ens224\niface ens224 inet dhcp\n"));
        assert!(out.contains("iface ens224 inet6 auto\n"));
        assert!(out.contains("auto lo2\n"));
        assert!(!out.contains("allow-hotplug ens192"));
        assert!(!out.contains("192.168.50"));
        assert!(!out.contains("fd00::9"));
        assert!(out.contains("\tmtu 1500\n"));
        assert!(out.contains("iface lo inet loopback"));
        assert_eq!(changes.len(), 3);
        // A second run finds nothing to do.
        assert!(ifupdown_to_dhcp(&out).is_none());
        assert!(ifupdown_to_dhcp("auto eth0\niface eth0 inet dhcp\n").is_none());
    }

    #[test]
    fn networkd() {
        assert!(networkd_is_static(
            "[Match]\nName=ens192\n[Network]\nAddress=192.168.1.2/24\nGateway=192.168.1.1\n"
        ));
        assert!(networkd_is_static(
            "[Match]\nName=ens192\n[Address]\nAddress=192.168.1.2/24\n"
        ));
        assert!(!networkd_is_static("[Match]\nName=e*\n[Network]\nDHCP=yes\n"));
        assert!(!networkd_is_static(NETWORKD_DHCP));
    }

    #[test]
    fn netplan() {
        let t = "network:\n  version: 2\n  renderer: networkd\n  ethernets:\n    ens192:\n      addresses: [192.168.1.5/24]\n      gateway4: 192.168.1.1\n";
        assert!(netplan_is_static(t));
        assert_eq!(netplan_renderer(t).as_deref(), Some("networkd"));
        let d = netplan_dhcp(Some("networkd"));
        assert!(!netplan_is_static(&d));
        assert!(d.contains("renderer: networkd\n"));
        assert!(!netplan_is_static(
            "network:\n  ethernets:\n    eth0:\n      dhcp4: true\n"
        ));
    }

    #[test]
    fn nm_keyfile() {
        let t = "[connection]\nid=Wired\ntype=ethernet\ninterface-name=ens192\n\n[ethernet]\nmac-address=00:50:56:aa:bb:cc\n\n[ipv4]\naddress1=192.168.1.5/24,192.168.1.1\ndns=192.168.1.1;\nmethod=manual\n\n[ipv6]\nmethod=auto\n";
        let out = nm_keyfile_to_dhcp(t).unwrap();
        assert!(out.contains("[ipv4]\nmethod=auto\n"));
        assert!(!out.contains("interface-name"));
        assert!(!out.contains("mac-address"));
        assert!(!out.contains("192.168"));
        assert!(out.contains("[ipv6]\nmethod=auto\n"));
        assert!(nm_keyfile_to_dhcp(&out).is_none());
    }

    #[test]
    fn ifcfg() {
        let t = "TYPE=Ethernet\nBOOTPROTO=none\nNAME=ens192\nDEVICE=ens192\nONBOOT=yes\nIPADDR=192.168.1.5\nPREFIX=24\nGATEWAY=192.168.1.1\nHWADDR=00:50:56:aa:bb:cc\n";
        let out = ifcfg_to_dhcp(t).unwrap();
        assert!(out.contains("BOOTPROTO=dhcp\n"));
        assert!(out.contains("ONBOOT=yes\n"));
        for gone in ["IPADDR", "PREFIX", "GATEWAY", "HWADDR", "DEVICE"] {
            assert!(!out.contains(gone), "{gone}");
        }
        assert!(ifcfg_to_dhcp(&out).is_none());
        assert!(ifcfg_to_dhcp("BOOTPROTO=dhcp\nDEVICE=eth0\n").is_none());
    }

    #[test]
    fn pins() {
        let r = pin_rules(&[("ens192".into(), "00:50:56:AA:BB:CC".into())]);
        assert!(r.contains("ATTR{address}==\"00:50:56:aa:bb:cc\", NAME=\"ens192\""));
    }
}

//! Device names: `/etc/fstab`, `/etc/crypttab`, the GRUB defaults, the initramfs resume device
//! and GRUB's `device.map` stop naming disks by the hypervisor's names (sdX, hdX, xvdX, vdX,
//! nvmeXnY), which change on KVM, and name file systems by `UUID=` (or `LABEL=` when a
//! file system has no UUID).

use super::guest::is_unstable_device_name;
use super::{Ctx, Error, StepReport};

/// Rewrites field `field` (0-based) of every non-comment line whose value `resolve` maps to a
/// stable name. Returns the new text and what changed.
pub fn rewrite_field(
    text: &str,
    field: usize,
    resolve: &dyn Fn(&str) -> Option<String>,
) -> (String, Vec<String>) {
    let mut changes = Vec::new();
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            out.push_str(line);
            continue;
        }
        // Locate the field by scanning whitespace-separated tokens, keeping the layout.
        let mut pos = line.len() - trimmed.len();
        let mut span = None;
        for i in 0..=field {
            let rest = &line[pos..];
            let start = pos + (rest.len() - rest.trim_start().len());
            let end = line[start..]
                .find(char::is_whitespace)
                .map_or(line.len(), |e| start + e);
            if start >= end {
                break;
            }
            if i == field {
                span = Some((start, end));
            }
            pos = end;
        }
        match span.and_then(|(s, e)| resolve(&line[s..e]).map(|new| (s, e, new))) {
            Some((s, e, new)) => {
                changes.push(format!("{} → {}", &line[s..e], new));
                out.push_str(&line[..s]);
                out.push_str(&new);
                out.push_str(&line[e..]);
            }
            None => out.push_str(line),
        }
    }
    (out, changes)
}

/// Rewrites `root=`, `resume=` (and `RESUME=`) device values anywhere in the text.
pub fn rewrite_kernel_args(text: &str, resolve: &dyn Fn(&str) -> Option<String>) -> (String, Vec<String>) {
    let mut changes = Vec::new();
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        loop {
            let found = ["root=", "resume=", "RESUME="]
                .iter()
                .filter_map(|k| rest.find(k).map(|i| (i, k.len())))
                .min();
            let Some((i, klen)) = found else {
                out.push_str(rest);
                break;
            };
            // Only a key at a word start (not e.g. `rootflags=` or `myroot=`).
            let at_word = i == 0
                || rest[..i]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_whitespace() || c == '"' || c == '\'');
            let vstart = i + klen;
            let vend = rest[vstart..]
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                .map_or(rest.len(), |e| vstart + e);
            let value = &rest[vstart..vend];
            out.push_str(&rest[..vstart]);
            match at_word.then(|| resolve(value)).flatten() {
                Some(new) => {
                    changes.push(format!("{}{value} → {}{new}", &rest[i..vstart], &rest[i..vstart]));
                    out.push_str(&new);
                }
                None => out.push_str(value),
            }
            rest = &rest[vend..];
        }
    }
    (out, changes)
}

/// The step.
pub fn run(ctx: &mut Ctx<'_>) -> Result<StepReport, Error> {
    let mut report = StepReport::new("device-names");
    let resolve = |name: &str| -> Option<String> {
        if !is_unstable_device_name(name) {
            return None;
        }
        ctx.stable_name_for(name)
    };
    let mut unresolved = Vec::new();
    let note_unresolved = |text: &str, field: usize, unresolved: &mut Vec<String>| {
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            if let Some(v) = line.split_whitespace().nth(field)
                && is_unstable_device_name(v)
                && ctx.stable_name_for(v).is_none()
            {
                unresolved.push(v.to_owned());
            }
        }
    };
    let mut edits: Vec<(&str, String, Vec<String>)> = Vec::new();
    if let Some(text) = ctx.fs.read("/etc/fstab")? {
        note_unresolved(&text, 0, &mut unresolved);
        let (new, ch) = rewrite_field(&text, 0, &resolve);
        edits.push(("/etc/fstab", new, ch));
    }
    if let Some(text) = ctx.fs.read("/etc/crypttab")? {
        note_unresolved(&text, 1, &mut unresolved);
        let (new, ch) = rewrite_field(&text, 1, &resolve);
        edits.push(("/etc/crypttab", new, ch));
    }
    for path in ["/etc/default/grub", "/etc/initramfs-tools/conf.d/resume"] {
        if let Some(text) = ctx.fs.read(path)? {
            let (new, ch) = rewrite_kernel_args(&text, &resolve);
            edits.push((path, new, ch));
        }
    }
    for (path, new, changes) in edits {
        if !changes.is_empty() && ctx.fs.write(path, &new, 0o644)? {
            for c in changes {
                report.act(format!("{path}: {c}"));
            }
        }
    }
    for map in ["/boot/grub/device.map", "/boot/grub2/device.map"] {
        if let Some(text) = ctx.fs.read(map)? {
            let stale = text
                .split_whitespace()
                .any(|w| w.starts_with("/dev/") && is_unstable_device_name(w));
            if stale && ctx.fs.remove(map)? {
                report.act(format!(
                    "{map}: removed (it named disks by hypervisor device names; GRUB works without it)"
                ));
            }
        }
    }
    unresolved.sort();
    unresolved.dedup();
    for u in unresolved {
        report.note(format!(
            "{u} names no partition of the given disks; left as it is"
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: &str) -> Option<String> {
        match v {
            "/dev/sda1" => Some("UUID=aaaa".into()),
            "/dev/sdb1" => Some("UUID=bbbb".into()),
            _ => None,
        }
    }

    #[test]
    fn fstab_fields_keep_their_layout() {
        let t = "# /dev/sda1 in a comment\n/dev/sda1\t/   ext4 defaults 0 1\n  /dev/sdb1  none swap sw 0 0\nUUID=cc /boot ext4 defaults 0 2\n/dev/sdc1 /data xfs defaults 0 2";
        let (out, ch) = rewrite_field(t, 0, &map);
        assert_eq!(
            out,
            "# /dev/sda1 in a comment\nUUID=aaaa\t/   ext4 defaults 0 1\n  UUID=bbbb  none swap sw 0 0\nUUID=cc /boot ext4 defaults 0 2\n/dev/sdc1 /data xfs defaults 0 2"
        );
        assert_eq!(ch.len(), 2);
        // Idempotent.
        let (again, ch2) = rewrite_field(&out, 0, &map);
        assert_eq!(again, out);
        assert!(ch2.is_empty());
    }

    #[test]
    fn crypttab_second_field() {
        let (out, ch) = rewrite_field("cryptdata /dev/sdb1 none luks\n", 1, &map);
        assert_eq!(out, "cryptdata UUID=bbbb none luks\n");
        assert_eq!(ch.len(), 1);
        let (out, ch) = rewrite_field("short\n", 1, &map);
        assert_eq!(out, "short\n");
        assert!(ch.is_empty());
    }

    #[test]
    fn kernel_args() {
        let t = "GRUB_CMDLINE_LINUX=\"root=/dev/sda1 rootflags=x resume=/dev/sdb1 quiet\"\n#GRUB_CMDLINE_LINUX=\"root=/dev/sda1\"\nGRUB_X='myroot=/dev/sda1'\n";
        let (out, ch) = rewrite_kernel_args(t, &map);
        assert_eq!(
            out,
            "GRUB_CMDLINE_LINUX=\"root=UUID=aaaa rootflags=x resume=UUID=bbbb quiet\"\n#GRUB_CMDLINE_LINUX=\"root=/dev/sda1\"\nGRUB_X='myroot=/dev/sda1'\n"
        );
        assert_eq!(ch.len(), 2);
        let (out, _) = rewrite_kernel_args("RESUME=/dev/sdb1\n", &map);
        assert_eq!(out, "RESUME=UUID=bbbb\n");
        let (out, ch) = rewrite_kernel_args("root=", &map);
        assert_eq!(out, "root=");
        assert!(ch.is_empty());
    }
}

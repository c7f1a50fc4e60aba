//! What a guest is: its OS (os-release), its fstab, and how its device names map onto the disks
//! the helper sees.

use serde::Serialize;

/// The OS families the repair knows how to treat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Debian, Ubuntu and derivatives.
    Debian,
    /// RHEL, CentOS, Rocky, Alma, Oracle, Fedora.
    Rhel,
    /// SLES, openSUSE.
    Suse,
    /// Arch and derivatives.
    Arch,
}

/// The guest's identity from `/etc/os-release` (or `/usr/lib/os-release`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OsInfo {
    /// `ID`.
    pub id: String,
    /// `ID_LIKE`, split.
    pub id_like: Vec<String>,
    /// `VERSION_ID`.
    pub version_id: String,
    /// `PRETTY_NAME`.
    pub pretty_name: String,
    /// The family, when known.
    pub family: Option<Family>,
}

impl OsInfo {
    /// Parses os-release text (shell-style `KEY=value` lines, values optionally quoted).
    pub fn parse(text: &str) -> Self {
        let mut get = std::collections::HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(v);
                get.insert(k.trim().to_owned(), v.replace("\\\"", "\""));
            }
        }
        let field = |k: &str| get.get(k).cloned().unwrap_or_default();
        let id = field("ID").to_ascii_lowercase();
        let id_like: Vec<String> = field("ID_LIKE")
            .split_whitespace()
            .map(str::to_ascii_lowercase)
            .collect();
        let family = std::iter::once(id.as_str())
            .chain(id_like.iter().map(String::as_str))
            .find_map(family_of);
        Self {
            id,
            id_like,
            version_id: field("VERSION_ID"),
            pretty_name: field("PRETTY_NAME"),
            family,
        }
    }
}

fn family_of(id: &str) -> Option<Family> {
    Some(match id {
        "debian" | "ubuntu" | "linuxmint" | "raspbian" | "devuan" | "pop" => Family::Debian,
        "rhel" | "centos" | "rocky" | "almalinux" | "ol" | "fedora" | "scientific" | "amzn" => Family::Rhel,
        "sles" | "sled" | "suse" | "opensuse" | "opensuse-leap" | "opensuse-tumbleweed" => Family::Suse,
        "arch" | "manjaro" | "endeavouros" => Family::Arch,
        _ => return None,
    })
}

/// One line of an fstab that mounts something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// The line number (0-based) in the file.
    pub line: usize,
    /// What is mounted (`UUID=…`, `/dev/sda1`, …).
    pub spec: String,
    /// Where.
    pub file: String,
    /// The file system type.
    pub vfstype: String,
    /// Mount options.
    pub options: String,
}

impl FstabEntry {
    /// Whether the options say `noauto`.
    pub fn noauto(&self) -> bool {
        self.options.split(',').any(|o| o == "noauto")
    }
}

/// Parses the mounting lines of an fstab (comments and blank lines are skipped; octal escapes
/// such as `\040` in paths are decoded).
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .enumerate()
        .filter_map(|(line, l)| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let mut f = l.split_whitespace();
            let spec = unescape(f.next()?);
            let file = unescape(f.next()?);
            let vfstype = f.next().unwrap_or("auto").to_owned();
            let options = f.next().unwrap_or("defaults").to_owned();
            Some(FstabEntry {
                line,
                spec,
                file,
                vfstype,
                options,
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1..i + 4)
                .is_some_and(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
        {
            let d = &b[i + 1..i + 4];
            let v = (d[0] - b'0') as u32 * 64 + (d[1] - b'0') as u32 * 8 + (d[2] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A device name as the guest knew it on its old hypervisor, decoded to (disk index,
/// partition number): `/dev/sda2` → (0, Some(2)), `/dev/xvdb` → (1, None),
/// `/dev/nvme0n1p3` → (0, Some(3)), `/dev/hdc1` → (2, Some(1)), `/dev/vda1` → (0, Some(1)).
/// Disk indexes follow the order of the disks given to the repair.
pub fn parse_device_name(name: &str) -> Option<(usize, Option<u32>)> {
    let n = name.strip_prefix("/dev/")?;
    if let Some(rest) = n.strip_prefix("nvme") {
        // nvme<ctrl>n<ns>[p<part>]
        let (ctrl, rest) = rest.split_once('n')?;
        let ctrl: usize = ctrl.parse().ok()?;
        let (ns, part) = match rest.split_once('p') {
            Some((ns, p)) => (ns, Some(p.parse::<u32>().ok()?)),
            None => (rest, None),
        };
        let ns: usize = ns.parse().ok()?;
        if ns != 1 {
            return None;
        }
        return Some((ctrl, part));
    }
    let rest = ["xvd", "sd", "hd", "vd"].iter().find_map(|p| n.strip_prefix(p))?;
    let letters: String = rest.chars().take_while(|c| c.is_ascii_lowercase()).collect();
    let digits = &rest[letters.len()..];
    if letters.is_empty() || letters.len() > 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut index = 0usize;
    for c in letters.chars() {
        index = index * 26 + (c as usize - 'a' as usize + 1);
    }
    let part = if digits.is_empty() {
        None
    } else {
        Some(digits.parse::<u32>().ok().filter(|p| *p > 0)?)
    };
    Some((index - 1, part))
}

/// Whether a kernel name is one of the hypervisor-specific names that change on KVM
/// (sdX, hdX, xvdX, vdX, nvme…).
pub fn is_unstable_device_name(name: &str) -> bool {
    parse_device_name(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_families() {
        let deb =
            OsInfo::parse("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n");
        assert_eq!(deb.family, Some(Family::Debian));
        assert_eq!(deb.version_id, "12");
        let rocky = OsInfo::parse("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n");
        assert_eq!(rocky.family, Some(Family::Rhel));
        let leap = OsInfo::parse("ID=\"opensuse-leap\"\nID_LIKE=\"suse opensuse\"\n");
        assert_eq!(leap.family, Some(Family::Suse));
        let mint = OsInfo::parse("ID=someos\nID_LIKE='ubuntu debian'\n");
        assert_eq!(mint.family, Some(Family::Debian));
        assert_eq!(OsInfo::parse("ID=haiku\n").family, None);
        assert_eq!(OsInfo::parse("").family, None);
    }

    #[test]
    fn fstab_lines() {
        let t = "# comment\nUUID=abc / ext4 errors=remount-ro 0 1\n\n/dev/sda1 /boot/efi vfat umask=0077 0 1\n/dev/sdb1 /mnt/my\\040data xfs noauto 0 0\n";
        let e = parse_fstab(t);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].line, 1);
        assert_eq!(e[1].spec, "/dev/sda1");
        assert_eq!(e[2].file, "/mnt/my data");
        assert!(e[2].noauto());
        assert!(!e[0].noauto());
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("\\04"), "\\04");
    }

    #[test]
    fn device_names() {
        assert_eq!(parse_device_name("/dev/sda2"), Some((0, Some(2))));
        assert_eq!(parse_device_name("/dev/xvdb"), Some((1, None)));
        assert_eq!(parse_device_name("/dev/hdc1"), Some((2, Some(1))));
        assert_eq!(parse_device_name("/dev/vda15"), Some((0, Some(15))));
        assert_eq!(parse_device_name("/dev/sdaa1"), Some((26, Some(1))));
        assert_eq!(parse_device_name("/dev/nvme0n1p3"), Some((0, Some(3))));
        assert_eq!(parse_device_name("/dev/nvme1n1"), Some((1, None)));
        for bad in [
            "/dev/sd",
            "/dev/sda0",
            "/dev/mapper/vg-root",
            "UUID=x",
            "/dev/sda1x",
            "/dev/nvme0n2p1",
            "/dev/loop0",
        ] {
            assert_eq!(parse_device_name(bad), None, "{bad}");
        }
    }
}

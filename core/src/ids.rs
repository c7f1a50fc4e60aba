//! Identifiers that travel in URLs, file names and manifests. Validated once on entry.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{kind} id {value:?} must be {min} to {max} characters long")]
    Length {
        kind: &'static str,
        value: String,
        min: usize,
        max: usize,
    },
    #[error("{kind} id {value:?} may only contain {allowed}")]
    Charset {
        kind: &'static str,
        value: String,
        allowed: &'static str,
    },
}

fn check(
    kind: &'static str,
    value: &str,
    min: usize,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(usize, u8) -> bool,
) -> Result<(), IdError> {
    if value.len() < min || value.len() > max {
        return Err(IdError::Length {
            kind,
            value: value.to_owned(),
            min,
            max,
        });
    }
    if !value.bytes().enumerate().all(|(i, b)| ok(i, b)) {
        return Err(IdError::Charset {
            kind,
            value: value.to_owned(),
            allowed,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $min:literal, $max:literal, $allowed:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                let ok: fn(usize, u8, usize) -> bool = $ok;
                let len = value.len();
                check($kind, &value, $min, $max, $allowed, |i, b| ok(i, b, len))?;
                Ok(Self(value))
            }
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(v: String) -> Result<Self, IdError> {
                Self::new(v)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

id_type!(
    /// A protected host. It is also the S3 bucket name on the gateway, so it follows the S3
    /// bucket rules: 3–63 of `a-z 0-9 -`, starting and ending with a letter or digit.
    HostId, "host", 3, 63, "a-z, 0-9 and '-' (not first or last)",
    |i, b, len| b.is_ascii_lowercase() || b.is_ascii_digit() || (b == b'-' && i != 0 && i + 1 != len)
);
id_type!(
    /// A disk of a host (e.g. `sda`, `disk0`): 1–64 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
    DiskId, "disk", 1, 64, "A-Z, a-z, 0-9, '-', '_' and '.' (not first)",
    |i, b, _| name_char(b) && !(i == 0 && b == b'.')
);
id_type!(
    /// A recovery point (and the sync that produces it): 1–64 of `A-Z a-z 0-9 - _ .`, not
    /// starting with `.`.
    PointId, "point", 1, 64, "A-Z, a-z, 0-9, '-', '_' and '.' (not first)",
    |i, b, _| name_char(b) && !(i == 0 && b == b'.')
);

impl PointId {
    /// A new point id that sorts by time: `YYYYMMDDTHHMMSSZ-<8 hex>`.
    pub fn generate(unix_ms: u64, random: u32) -> Self {
        let secs = unix_ms / 1000;
        let (y, mo, d, h, mi, s) = civil_from_unix(secs);
        Self(format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z-{random:08x}"))
    }
}

/// Unix seconds to (year, month, day, hour, minute, second) in UTC (proleptic Gregorian).
pub fn civil_from_unix(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-from-civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_follow_bucket_rules() {
        assert!(HostId::new("web-01").is_ok());
        assert!(HostId::new("ab").is_err());
        assert!(HostId::new("-web").is_err());
        assert!(HostId::new("web-").is_err());
        assert!(HostId::new("Web").is_err());
        assert!(HostId::new("a".repeat(64)).is_err());
    }

    #[test]
    fn disk_and_point_ids() {
        assert!(DiskId::new("sda").is_ok());
        assert!(DiskId::new("nvme0n1.p1_x-y").is_ok());
        assert!(DiskId::new(".hidden").is_err());
        assert!(DiskId::new("a/b").is_err());
        assert!(DiskId::new("").is_err());
        assert!(PointId::new("..").is_err());
    }

    #[test]
    fn generated_point_ids_sort_by_time() {
        let a = PointId::generate(1_700_000_000_000, 0xffff_ffff);
        let b = PointId::generate(1_700_000_001_000, 0);
        assert_eq!(a.as_str(), "20231114T221320Z-ffffffff");
        assert!(a < b);
    }
}

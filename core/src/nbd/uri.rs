//! NBD URIs (the subset of <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>
//! this client speaks).

use std::fmt;
use std::path::PathBuf;

use super::NbdError;

/// The default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// A TCP host (name, IPv4 or IPv6 address without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URI: where to connect, which export, whether TLS is required.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// The server's address.
    pub addr: NbdAddr,
    /// The export name (percent-decoded; empty for the server's default export).
    pub export: String,
    /// `nbds` schemes: TLS is required.
    pub tls: bool,
}

impl NbdUri {
    /// Parses one of:
    ///
    /// - `nbd://host[:port]/export` (TCP, port 10809 by default; IPv6 as `[::1]`),
    /// - `nbds://host[:port]/export` (TCP, TLS required),
    /// - `nbd+unix:///export?socket=/path` (unix socket),
    /// - `nbds+unix:///export?socket=/path` (unix socket, TLS required).
    ///
    /// The export is the path without its first `/` (so `nbd://h/` and `nbd://h` name the
    /// default export `""`), percent-decoded. `socket` is the only query parameter accepted;
    /// user info and fragments are refused.
    pub fn parse(uri: &str) -> Result<Self, NbdError> {
        let err = |reason: &str| NbdError::Uri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| err("missing scheme"))?;
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbds" => (false, true),
            "nbd+unix" => (true, false),
            "nbds+unix" => (true, true),
            _ => return Err(err("the scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        if rest.contains('#') {
            return Err(err("fragments are not supported"));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| err("invalid percent-encoding in the export name"))?;
        let export = String::from_utf8(export).map_err(|_| err("the export name is not UTF-8"))?;
        if export.len() > super::proto::MAX_STRING || export.contains('\0') {
            return Err(err("the export name is too long or contains NUL"));
        }
        let mut socket = None;
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "socket" if socket.is_none() => {
                    let value =
                        percent_decode(value).ok_or_else(|| err("invalid percent-encoding in socket"))?;
                    let value = String::from_utf8(value).map_err(|_| err("the socket path is not UTF-8"))?;
                    if value.is_empty() {
                        return Err(err("empty socket path"));
                    }
                    socket = Some(PathBuf::from(value));
                }
                "socket" => return Err(err("socket given twice")),
                _ => return Err(err("unsupported query parameter (only socket= is understood)")),
            }
        }
        if authority.contains('@') {
            return Err(err("user info is not supported"));
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(err(
                    "a unix-socket URI has no host (nbd+unix:///export?socket=PATH)",
                ));
            }
            NbdAddr::Unix(socket.ok_or_else(|| err("a unix-socket URI needs ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(err("socket= is only valid with nbd+unix:// or nbds+unix://"));
            }
            let (host, port) = split_host_port(authority).ok_or_else(|| err("invalid host or port"))?;
            if host.is_empty() {
                return Err(err("missing host"));
            }
            NbdAddr::Tcp {
                host: host.to_owned(),
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(Self { addr, export, tls })
    }
}

impl std::str::FromStr for NbdUri {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        let export = percent_encode(&self.export);
        match &self.addr {
            NbdAddr::Tcp { .. } => write!(f, "nbd{s}://{}/{export}", self.addr),
            NbdAddr::Unix(path) => write!(
                f,
                "nbd{s}+unix:///{export}?socket={}",
                percent_encode(&path.to_string_lossy())
            ),
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` → (host without brackets, port).
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return None;
        }
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (authority, None),
        }
    };
    let valid_host = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if !valid_host {
        return None;
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => Some(p),
            _ => return None,
        },
        None => None,
    };
    Some((host, port))
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> NbdAddr {
        NbdAddr::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn parses_the_supported_forms() {
        let cases = [
            (
                "nbd://example.com/disk0",
                tcp("example.com", 10809),
                "disk0",
                false,
            ),
            ("nbd://10.0.0.1:10810/a%20b", tcp("10.0.0.1", 10810), "a b", false),
            ("nbds://[::1]:7000/x", tcp("::1", 7000), "x", true),
            ("nbds://[fe80::1]/", tcp("fe80::1", 10809), "", true),
            ("nbd://host", tcp("host", 10809), "", false),
            ("nbd://host//abs", tcp("host", 10809), "/abs", false),
            (
                "nbd+unix:///vda?socket=/run/nbd.sock",
                NbdAddr::Unix("/run/nbd.sock".into()),
                "vda",
                false,
            ),
            (
                "nbds+unix:///?socket=/tmp/a%20b",
                NbdAddr::Unix("/tmp/a b".into()),
                "",
                true,
            ),
            ("NBD+UNIX:///e?socket=s", NbdAddr::Unix("s".into()), "e", false),
        ];
        for (uri, addr, export, tls) in cases {
            let u = NbdUri::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(u.addr, addr, "{uri}");
            assert_eq!(u.export, export, "{uri}");
            assert_eq!(u.tls, tls, "{uri}");
            // Display gives a URI that parses back to the same thing.
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u, "{uri} -> {u}");
        }
    }

    #[test]
    fn refuses_the_rest() {
        for uri in [
            "",
            "nbd:/host/x",
            "http://host/x",
            "nbd://",
            "nbd:///x",
            "nbd://host:0/x",
            "nbd://host:99999/x",
            "nbd://host:port/x",
            "nbd://user@host/x",
            "nbd://::1/x",
            "nbd://[nothex]/x",
            "nbd://host/x#frag",
            "nbd://host/x?socket=/s",
            "nbd://host/x?tls-certificates=/etc",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=",
            "nbd+unix:///x?socket=/a&socket=/b",
            "nbd://host/%zz",
            "nbd://host/%ff",
            "nbd://host/a%00b",
        ] {
            let e = NbdUri::parse(uri).expect_err(uri);
            assert!(e.to_string().starts_with("invalid NBD URI"), "{uri}: {e}");
        }
    }
}

//! Provisioning a gateway's data directory while the gateway is stopped: what the appliance's
//! first boot does with the operator's config drive (`image/gateway/`, `docs/boot-in-cloud.md`).
//!
//! Data-plane keys are imported with the secret the operator chose (sealed under the master key
//! exactly as `key create` seals the ones it makes: SigV4 needs the secret on the server side,
//! so it cannot be a one-way hash); the admin credential is stored as its SHA-256 only, plus the
//! `admin.token` file (0600) that the local admin commands read. The metadata DB is opened
//! exclusively: a running gateway on the same data directory makes these calls fail (use
//! `tern-gateway key create` against a running gateway instead).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tern_core::HostId;

use crate::db::{DbError, KeyRecord, MetaDb};
use crate::fsutil::write_secret_atomic;
use crate::secrets::{MasterKey, SecretError, token_hash};
use crate::server::admin_token_path;

/// The `meta` entry that holds the SHA-256 of the admin token.
pub const ADMIN_TOKEN_META: &str = "admin_token_sha256";

/// Why provisioning failed. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("invalid access key id {0:?}: 3-128 of A-Z, a-z, 0-9")]
    KeyId(String),
    #[error("invalid secret access key of {0}: 16-128 printable ASCII characters, no spaces")]
    Secret(String),
    #[error("key {0} has no host")]
    NoHost(String),
    #[error("invalid admin token: 32-256 printable ASCII characters, no spaces")]
    AdminToken,
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Secrets(#[from] SecretError),
    #[error("cannot open the metadata DB (is the gateway running on this data directory?)")]
    Db(#[from] DbError),
    #[error("cannot read the keys document {path}")]
    ReadDoc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keys document {path} is not valid")]
    ParseDoc {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("keys document version {0} is not supported (1 is)")]
    Version(u32),
    #[error("gateway_toml of the keys document is not a valid gateway configuration")]
    GatewayToml(#[source] Box<toml::de::Error>),
}

/// The operator's keys document (`tern/keys.json` on the appliance's config drive).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysDoc {
    /// Format version: 1.
    pub version: u32,
    /// The gateway's configuration file (TOML text, `docs/gateway.md`), for config drives that
    /// carry one document only (cloud-init user-data); checked here, written by the caller.
    pub gateway_toml: Option<String>,
    /// The control plane's admin token (absent: the gateway makes one at its first start and
    /// writes it to `<data_dir>/admin.token`).
    pub admin_token: Option<String>,
    /// Data-plane access keys.
    #[serde(default)]
    pub keys: Vec<KeyImport>,
}

/// One data-plane access key to import.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyImport {
    /// Its id (what agents pass as `--access-key-id`).
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// The hosts it may sync.
    pub hosts: Vec<HostId>,
}

impl std::fmt::Debug for KeyImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyImport")
            .field("access_key_id", &self.access_key_id)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl KeysDoc {
    /// Reads and checks a keys document.
    pub fn load(path: &Path) -> Result<Self, ProvisionError> {
        let bytes = std::fs::read(path).map_err(|source| ProvisionError::ReadDoc {
            path: path.to_owned(),
            source,
        })?;
        let doc: Self = serde_json::from_slice(&bytes).map_err(|source| ProvisionError::ParseDoc {
            path: path.to_owned(),
            source,
        })?;
        doc.check()?;
        Ok(doc)
    }

    fn check(&self) -> Result<(), ProvisionError> {
        if self.version != 1 {
            return Err(ProvisionError::Version(self.version));
        }
        if let Some(t) = &self.admin_token {
            check_admin_token(t)?;
        }
        if let Some(t) = &self.gateway_toml {
            toml::from_str::<crate::config::ConfigFile>(t)
                .map_err(|e| ProvisionError::GatewayToml(Box::new(e)))?;
        }
        for k in &self.keys {
            k.check()?;
        }
        Ok(())
    }
}

impl KeyImport {
    fn check(&self) -> Result<(), ProvisionError> {
        check_key_id(&self.access_key_id)?;
        check_secret(&self.access_key_id, &self.secret_access_key)?;
        if self.hosts.is_empty() {
            return Err(ProvisionError::NoHost(self.access_key_id.clone()));
        }
        Ok(())
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

fn check_key_id(id: &str) -> Result<(), ProvisionError> {
    if (3..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(ProvisionError::KeyId(id.to_owned()))
    }
}

fn check_secret(id: &str, secret: &str) -> Result<(), ProvisionError> {
    if (16..=128).contains(&secret.len()) && printable(secret) {
        Ok(())
    } else {
        Err(ProvisionError::Secret(id.to_owned()))
    }
}

fn check_admin_token(token: &str) -> Result<(), ProvisionError> {
    if (32..=256).contains(&token.len()) && printable(token) {
        Ok(())
    } else {
        Err(ProvisionError::AdminToken)
    }
}

/// A stopped gateway's data directory, opened for provisioning.
#[derive(Debug)]
pub struct Provisioner {
    dir: PathBuf,
    master: MasterKey,
    db: MetaDb,
}

/// What [`Provisioner::import_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// A new key.
    Added,
    /// A key of that id existed and was replaced.
    Replaced,
}

impl Provisioner {
    /// Opens `data_dir` (created with mode 0700 if missing), its master key and metadata DB
    /// (both created if missing, as the gateway's first start would).
    pub fn open(data_dir: &Path) -> Result<Self, ProvisionError> {
        if !data_dir.exists() {
            let mut b = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(b.recursive(true), 0o700);
            b.create(data_dir).map_err(|source| ProvisionError::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
        }
        let master = MasterKey::load_or_create(&data_dir.join("master.key"))?;
        let db = MetaDb::open(&data_dir.join("meta.redb"))?;
        Ok(Self {
            dir: data_dir.to_owned(),
            master,
            db,
        })
    }

    /// Imports (or replaces) a data-plane key.
    pub fn import_key(&self, key: &KeyImport, now_unix_ms: u64) -> Result<Imported, ProvisionError> {
        key.check()?;
        let existed = self.db.key(&key.access_key_id)?.is_some();
        let rec = KeyRecord {
            hosts: key.hosts.clone(),
            sealed_secret: hex::encode(self.master.seal(&key.access_key_id, &key.secret_access_key)),
            created_unix_ms: now_unix_ms,
        };
        self.db.insert_key(&key.access_key_id, &rec)?;
        Ok(if existed {
            Imported::Replaced
        } else {
            Imported::Added
        })
    }

    /// Sets the admin token: its SHA-256 in the DB, the token in `admin.token` (0600).
    pub fn set_admin_token(&self, token: &str) -> Result<(), ProvisionError> {
        check_admin_token(token)?;
        let path = admin_token_path(&self.dir);
        write_secret_atomic(&path, format!("{token}\n").as_bytes())
            .map_err(|source| ProvisionError::Write { path, source })?;
        self.db.set_meta(ADMIN_TOKEN_META, &token_hash(token))?;
        Ok(())
    }

    /// Applies a keys document; returns the imported key ids and what happened to each.
    pub fn apply(&self, doc: &KeysDoc, now_unix_ms: u64) -> Result<Vec<(String, Imported)>, ProvisionError> {
        doc.check()?;
        if let Some(t) = &doc.admin_token {
            self.set_admin_token(t)?;
        }
        doc.keys
            .iter()
            .map(|k| Ok((k.access_key_id.clone(), self.import_key(k, now_unix_ms)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::token_matches;

    fn key(id: &str, secret: &str, host: &str) -> KeyImport {
        KeyImport {
            access_key_id: id.into(),
            secret_access_key: secret.into(),
            hosts: vec![HostId::new(host).unwrap()],
        }
    }

    #[test]
    fn imported_keys_are_sealed_and_replaceable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("gw");
        let p = Provisioner::open(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );
        let secret = "0123456789abcdefSECRETsecret";
        assert_eq!(
            p.import_key(&key("TKAPPLIANCE01", secret, "web-01"), 1).unwrap(),
            Imported::Added
        );
        assert_eq!(
            p.import_key(&key("TKAPPLIANCE01", secret, "web-02"), 2).unwrap(),
            Imported::Replaced
        );
        drop(p);
        // The DB holds only the sealed form; the gateway's master key opens it.
        let db_bytes = std::fs::read(dir.join("meta.redb")).unwrap();
        assert!(!db_bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        let db = MetaDb::open(&dir.join("meta.redb")).unwrap();
        let rec = db.key("TKAPPLIANCE01").unwrap().unwrap();
        assert_eq!(rec.hosts, vec![HostId::new("web-02").unwrap()]);
        let master = MasterKey::load_or_create(&dir.join("master.key")).unwrap();
        let sealed = hex::decode(&rec.sealed_secret).unwrap();
        assert_eq!(master.open("TKAPPLIANCE01", &sealed).unwrap(), secret);
    }

    #[test]
    fn admin_token_is_stored_as_a_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Provisioner::open(tmp.path()).unwrap();
        let token = "a".repeat(40);
        p.set_admin_token(&token).unwrap();
        assert!(matches!(
            p.set_admin_token("short"),
            Err(ProvisionError::AdminToken)
        ));
        let stored = p.db.meta(ADMIN_TOKEN_META).unwrap().unwrap();
        let stored: [u8; 32] = stored.try_into().unwrap();
        assert!(token_matches(&token, &stored));
        let file = std::fs::metadata(admin_token_path(tmp.path())).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&file.permissions()) & 0o077,
            0
        );
    }

    #[test]
    fn documents_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("keys.json");
        let write = |s: &str| std::fs::write(&path, s).unwrap();
        write(
            r#"{"version":1,"admin_token":"0123456789012345678901234567890123",
                "keys":[{"access_key_id":"TKWEB01","secret_access_key":"abcdefghijklmnop/+=","hosts":["web-01"]}]}"#,
        );
        let doc = KeysDoc::load(&path).unwrap();
        assert!(doc.gateway_toml.is_none());
        assert!(!format!("{doc:?}").contains("abcdefghijklmnop"));
        let p = Provisioner::open(&tmp.path().join("gw")).unwrap();
        let done = p.apply(&doc, 5).unwrap();
        assert_eq!(done, vec![("TKWEB01".to_owned(), Imported::Added)]);
        write(r#"{"version":1,"gateway_toml":"[data_plane]\nlisten = \"0.0.0.0:8443\"\n"}"#);
        assert!(
            KeysDoc::load(&path)
                .unwrap()
                .gateway_toml
                .unwrap()
                .contains("8443")
        );
        for bad in [
            r#"{"version":2,"keys":[]}"#,
            r#"{"version":1,"gateway_toml":"datadir = 1"}"#,
            r#"{"version":1,"keys":[],"extra":1}"#,
            r#"{"version":1,"admin_token":"short"}"#,
            r#"{"version":1,"keys":[{"access_key_id":"TK-1","secret_access_key":"abcdefghijklmnopq","hosts":["web-01"]}]}"#,
            r#"{"version":1,"keys":[{"access_key_id":"TK1","secret_access_key":"short","hosts":["web-01"]}]}"#,
            r#"{"version":1,"keys":[{"access_key_id":"TK1","secret_access_key":"abcdefghij klmnopq","hosts":["web-01"]}]}"#,
            r#"{"version":1,"keys":[{"access_key_id":"TK1","secret_access_key":"abcdefghijklmnopq","hosts":[]}]}"#,
            r#"{"version":1,"keys":[{"access_key_id":"TK1","secret_access_key":"abcdefghijklmnopq","hosts":["Web_01"]}]}"#,
        ] {
            write(bad);
            let e = KeysDoc::load(&path).unwrap_err();
            assert!(!e.to_string().contains("abcdefghij"), "{e}");
        }
    }
}

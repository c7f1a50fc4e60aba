//! The Cloud Sync Gateway.
//!
//! - [`s3`]: the data plane, the S3 API mapped onto block mode (`docs/protocol.md`).
//! - [`blockstore`]: volumes, open syncs, landed extents and commits: where the gateway writes
//!   a volume and makes a recovery point.
//! - [`provider`]: cloud providers (volumes, snapshots, instances); [`provider::local`] is the
//!   default.
//! - [`recovery`]: Boot-in-Cloud orchestration (recoveries into instances).
//! - [`db`]: the metadata DB (redb).
//! - [`control`]: REST API, `/healthz`, `/metrics`.
//! - [`secrets`], [`tls`]: access keys, admin credential, certificate.
//! - [`plan`]: how many gateways a fleet needs.
//! - [`provision`]: keys and admin credential put into a stopped gateway's data directory
//!   (the appliance's first boot).
//! - [`server`]: start-up and the TLS listeners.

pub mod blockstore;
pub mod config;
pub mod control;
pub mod db;
pub mod fsutil;
pub mod metrics;
pub mod objects;
pub mod plan;
pub mod provider;
pub mod provision;
pub mod recovery;
pub mod s3;
pub mod secrets;
pub mod server;
pub mod tls;

//! Object mode: a host's disks as content-addressed chunks in any S3 bucket, a manifest per
//! recovery point, retention and garbage collection. Protocol and safety argument in
//! `docs/object-mode.md`; byte layouts in `docs/formats.md`.
//!
//! - [`crypto`]: the customer's key (keyed chunk ids, AEAD).
//! - [`blob`]: one chunk as an object (zstd, sealing, verification).
//! - [`repo`]: the object layout and typed access to it.
//! - [`session`]: one sync's writer side (lease, known chunks, commit).
//! - [`retention`], [`gc`]: pruning and garbage collection.
//! - [`s3`]: connecting to a bucket.

pub mod blob;
pub mod crypto;
#[cfg(feature = "object")]
pub mod gc;
#[cfg(feature = "object")]
pub mod repo;
#[cfg(feature = "object")]
pub mod retention;
#[cfg(feature = "object")]
pub mod s3;
#[cfg(feature = "object")]
pub mod session;

pub use crypto::{Cipher, StoreKey};
#[cfg(feature = "object")]
pub use repo::Repo;
#[cfg(feature = "object")]
pub use session::{SessionOptions, SyncSession};

#[cfg(all(test, feature = "object"))]
mod tests;

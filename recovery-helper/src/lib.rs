//! The recovery helper: the one job of the boot-helper OS.
//!
//! - [`restore`]: a recovery point's disks from object storage to block devices or files.
//! - [`describe`]: a human summary of a manifest.
//! - [`job`]: the helper VM's job (format, where it is found, the console protocol).
//! - [`repair`]: Boot-in-Cloud driver adaptation of a guest's disks (virtio, UEFI → BIOS, DHCP,
//!   hypervisor tools off).

pub mod job;
pub mod repair;
pub mod restore;

use std::fmt::Write as _;

use tern_core::{ChunkRef, Manifest};

/// A human summary of a manifest: host, point, time and per disk its size, chunks and how many
/// are zero.
pub fn describe(m: &Manifest) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "host {} point {} created {} ms",
        m.host_id, m.point_id, m.created_unix_ms
    );
    for d in &m.disks {
        let zero = d.chunks.iter().filter(|c| **c == ChunkRef::Zero).count();
        let _ = writeln!(
            s,
            "  disk {}: {} bytes, {} chunks of {} bytes, {} zero",
            d.disk_id,
            d.geometry.size(),
            d.chunks.len(),
            d.geometry.chunk_size(),
            zero
        );
    }
    s
}

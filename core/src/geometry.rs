//! Chunk geometry: how a disk of a given size is cut into chunks and compare blocks.
//!
//! A disk is cut into chunks of `chunk_size` bytes (a power of two from 64 KiB to 16 MiB,
//! 4 MiB by default); the last chunk may be short. Chunks are the unit of the manifest and
//! of object storage. Block mode compares and sends at a finer `block_size` (a power of two
//! from 4 KiB up to the chunk size), so a 4 KiB write costs one small extent.

use std::ops::Range;

/// Default chunk size: 4 MiB, the seed's region size (and Proxmox Backup Server's).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Smallest allowed chunk size.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest allowed chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default compare granularity of block mode.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Alignment of every extent offset and length (except a length that ends at the disk's end).
pub const EXTENT_ALIGN: u64 = 4096;
/// Largest disk Tern accepts (1 PiB): keeps every offset computation far from overflow.
pub const MAX_DISK_SIZE: u64 = 1 << 50;

/// Why a geometry or an extent was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("chunk size {0} is not a power of two between 64 KiB and 16 MiB")]
    ChunkSize(u64),
    #[error("block size {block} is not a power of two between 4 KiB and the chunk size {chunk}")]
    BlockSize { block: u64, chunk: u64 },
    #[error("disk size {0} is zero, not a multiple of 512 or larger than 1 PiB")]
    DiskSize(u64),
    #[error("extent at {offset} of {len} bytes is empty or ends past the disk's end ({size})")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("extent at {offset} of {len} bytes is not aligned to 4 KiB")]
    Misaligned { offset: u64, len: u64 },
    #[error("extent at {offset} of {len} bytes crosses a chunk boundary (chunk size {chunk})")]
    CrossesChunk { offset: u64, len: u64, chunk: u64 },
}

/// The geometry of one disk: its size and chunk size. Always valid once constructed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawGeometry", into = "RawGeometry")]
pub struct ChunkGeometry {
    size: u64,
    chunk_size: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeometry {
    size: u64,
    chunk_size: u32,
}

impl TryFrom<RawGeometry> for ChunkGeometry {
    type Error = GeometryError;
    fn try_from(r: RawGeometry) -> Result<Self, GeometryError> {
        Self::new(r.size, r.chunk_size)
    }
}

impl From<ChunkGeometry> for RawGeometry {
    fn from(g: ChunkGeometry) -> Self {
        RawGeometry {
            size: g.size,
            chunk_size: g.chunk_size,
        }
    }
}

/// Checks that `chunk_size` is an allowed chunk size.
pub fn check_chunk_size(chunk_size: u64) -> Result<u32, GeometryError> {
    if chunk_size.is_power_of_two()
        && (u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk_size)
    {
        Ok(chunk_size as u32)
    } else {
        Err(GeometryError::ChunkSize(chunk_size))
    }
}

impl ChunkGeometry {
    /// A disk of `size` bytes (a non-zero multiple of 512) cut into `chunk_size` chunks.
    pub fn new(size: u64, chunk_size: u32) -> Result<Self, GeometryError> {
        check_chunk_size(u64::from(chunk_size))?;
        if size == 0 || !size.is_multiple_of(512) || size > MAX_DISK_SIZE {
            return Err(GeometryError::DiskSize(size));
        }
        Ok(Self { size, chunk_size })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks (the last may be short).
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// Byte range of chunk `index` (clipped to the disk's end).
    ///
    /// # Panics
    /// If `index >= chunk_count()`: callers iterate over `0..chunk_count()`.
    pub fn chunk_range(&self, index: u64) -> Range<u64> {
        assert!(index < self.chunk_count(), "chunk {index} out of range");
        let start = index * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.size)
    }

    /// Length of chunk `index` in bytes.
    pub fn chunk_len(&self, index: u64) -> u32 {
        let r = self.chunk_range(index);
        (r.end - r.start) as u32
    }

    /// The chunk that holds byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset / u64::from(self.chunk_size)
    }

    /// Checks a block-mode extent: non-empty, inside the disk, offset aligned to 4 KiB, length a
    /// multiple of 4 KiB unless it ends at the disk's end, and inside one chunk. Returns the
    /// chunk index.
    pub fn check_extent(&self, offset: u64, len: u64) -> Result<u64, GeometryError> {
        let end = offset.checked_add(len);
        if len == 0 || end.is_none_or(|e| e > self.size) {
            return Err(GeometryError::OutOfBounds {
                offset,
                len,
                size: self.size,
            });
        }
        let end = offset + len;
        if !offset.is_multiple_of(EXTENT_ALIGN) || (!len.is_multiple_of(EXTENT_ALIGN) && end != self.size) {
            return Err(GeometryError::Misaligned { offset, len });
        }
        let chunk = self.chunk_of(offset);
        if self.chunk_of(end - 1) != chunk {
            return Err(GeometryError::CrossesChunk {
                offset,
                len,
                chunk: u64::from(self.chunk_size),
            });
        }
        Ok(chunk)
    }

    /// Splits the byte range `offset..offset+len` (clipped to the disk) into per-chunk pieces
    /// `(chunk index, range)`.
    pub fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, Range<u64>)> + '_ {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset.min(end);
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let chunk = self.chunk_of(pos);
            let piece_end = self.chunk_range(chunk).end.min(end);
            let piece = pos..piece_end;
            pos = piece_end;
            Some((chunk, piece))
        })
    }
}

/// How compare blocks sit inside a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    chunk_size: u32,
    block_size: u32,
}

impl BlockLayout {
    /// Compare blocks of `block_size` inside chunks of `chunk_size`.
    pub fn new(chunk_size: u32, block_size: u32) -> Result<Self, GeometryError> {
        check_chunk_size(u64::from(chunk_size))?;
        if !block_size.is_power_of_two() || block_size < EXTENT_ALIGN as u32 || block_size > chunk_size {
            return Err(GeometryError::BlockSize {
                block: u64::from(block_size),
                chunk: u64::from(chunk_size),
            });
        }
        Ok(Self {
            chunk_size,
            block_size,
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Blocks in a full chunk.
    pub fn blocks_per_chunk(&self) -> usize {
        (self.chunk_size / self.block_size) as usize
    }

    /// Number of blocks in a chunk of `chunk_len` bytes (the last block may be short).
    pub fn blocks_in(&self, chunk_len: u32) -> usize {
        chunk_len.div_ceil(self.block_size) as usize
    }

    /// Byte range of block `index` inside a chunk of `chunk_len` bytes.
    pub fn block_range(&self, chunk_len: u32, index: usize) -> Range<usize> {
        let start = index * self.block_size as usize;
        start..(start + self.block_size as usize).min(chunk_len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_sizes() {
        for shift in 16..=24 {
            assert!(check_chunk_size(1 << shift).is_ok());
        }
        assert!(check_chunk_size(1 << 15).is_err());
        assert!(check_chunk_size(1 << 25).is_err());
        assert!(check_chunk_size(3 << 20).is_err());
    }

    #[test]
    fn last_chunk_is_short() {
        let g = ChunkGeometry::new(10 * 1024 * 1024 + 4096, DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(g.chunk_count(), 3);
        assert_eq!(g.chunk_len(2), 2 * 1024 * 1024 + 4096);
        assert_eq!(g.chunk_range(2).end, g.size());
    }

    #[test]
    fn extents() {
        let g = ChunkGeometry::new(8 * 1024 * 1024 + 512, DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(g.check_extent(0, 4096), Ok(0));
        assert_eq!(g.check_extent(4 << 20, 4 << 20), Ok(1));
        assert!(matches!(
            g.check_extent(4096, 4 << 20),
            Err(GeometryError::CrossesChunk { .. })
        ));
        assert!(matches!(
            g.check_extent(512, 4096),
            Err(GeometryError::Misaligned { .. })
        ));
        // The tail of a disk whose size is not a multiple of 4 KiB.
        assert_eq!(g.check_extent(8 << 20, 512), Ok(2));
        assert!(matches!(
            g.check_extent(8 << 20, 4096),
            Err(GeometryError::OutOfBounds { .. })
        ));
        assert!(matches!(
            g.check_extent(u64::MAX - 10, 4096),
            Err(GeometryError::OutOfBounds { .. })
        ));
        assert!(matches!(
            g.check_extent(0, 0),
            Err(GeometryError::OutOfBounds { .. })
        ));
    }

    proptest! {
        #[test]
        fn chunks_tile_the_disk(sectors in 1u64..(1 << 22), shift in 16u32..=24) {
            let g = ChunkGeometry::new(sectors * 512, 1 << shift).unwrap();
            let mut pos = 0;
            for i in 0..g.chunk_count() {
                let r = g.chunk_range(i);
                prop_assert_eq!(r.start, pos);
                prop_assert!(r.end > r.start);
                prop_assert!(r.end - r.start <= u64::from(g.chunk_size()));
                prop_assert_eq!(g.chunk_of(r.start), i);
                prop_assert_eq!(g.chunk_of(r.end - 1), i);
                pos = r.end;
            }
            prop_assert_eq!(pos, g.size());
        }

        #[test]
        fn split_covers_exactly(sectors in 1u64..(1 << 20), off in 0u64..(1 << 30), len in 0u64..(64 << 20)) {
            let g = ChunkGeometry::new(sectors * 512, 1 << 16).unwrap();
            let end = off.saturating_add(len).min(g.size());
            let mut pos = off.min(end);
            for (chunk, r) in g.split(off, len) {
                prop_assert_eq!(r.start, pos);
                prop_assert!(r.end > r.start);
                prop_assert_eq!(g.chunk_of(r.start), chunk);
                prop_assert_eq!(g.chunk_of(r.end - 1), chunk);
                prop_assert!(g.check_extent(r.start, r.end - r.start).is_ok() || !r.start.is_multiple_of(4096) || !(r.end - r.start).is_multiple_of(4096));
                pos = r.end;
            }
            prop_assert_eq!(pos, end);
        }

        #[test]
        fn blocks_tile_a_chunk(shift in 16u32..=24, bshift in 12u32..=24, len_frac in 1u32..=1000) {
            prop_assume!(bshift <= shift);
            let layout = BlockLayout::new(1 << shift, 1 << bshift).unwrap();
            let chunk_len = ((u64::from(1u32 << shift) * u64::from(len_frac) / 1000).max(512) / 512 * 512) as u32;
            let mut pos = 0;
            for i in 0..layout.blocks_in(chunk_len) {
                let r = layout.block_range(chunk_len, i);
                prop_assert_eq!(r.start, pos);
                prop_assert!(r.end > r.start);
                pos = r.end;
            }
            prop_assert_eq!(pos, chunk_len as usize);
        }
    }
}

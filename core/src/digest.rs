//! BLAKE3 chunk digests.
//!
//! A chunk's digest is the standard BLAKE3 hash of its bytes. Block mode also keeps, for each
//! compare block of a chunk, the BLAKE3 *chaining value* of that block at its position in the
//! chunk ([`blake3::hazmat`]); those values merge into the chunk digest without hashing the
//! data a second time, and they tell which blocks changed since the last sync.

use std::fmt;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::geometry::BlockLayout;

/// A 32-byte BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

/// True when every byte of `buf` is zero. Reads 256 bytes at a time (the compiler vectorises
/// the OR-reduction) and stops at the first non-zero block, so it costs far less than a hash.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(256);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|b| *b == 0)
}

/// The per-block hash state of one chunk, as block mode stores it.
///
/// `blocks[i]` is the BLAKE3 chaining value of block `i` at its offset inside the chunk (for a
/// chunk of a single block, the block's root hash). Two chunks at the same position have equal
/// block values exactly where their blocks are equal (up to BLAKE3 collisions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    /// The chunk's BLAKE3 digest, or `None` when the chunk is all zeros.
    pub digest: Option<Digest>,
    /// One value per compare block.
    pub blocks: Vec<[u8; 32]>,
}

/// Hashes chunks block by block. Zero blocks are recognised without hashing: their values at
/// each position are computed once here.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    layout: BlockLayout,
    /// The key of keyed BLAKE3 (object mode with encryption: chunk ids that leak nothing).
    key: Option<[u8; 32]>,
    zero_full_blocks: Vec<ChainingValue>,
}

impl BlockHasher {
    /// A hasher for `layout`.
    pub fn new(layout: BlockLayout) -> Self {
        Self::with_key(layout, None)
    }

    /// A hasher whose digests are keyed BLAKE3 under `key` (`None`: plain BLAKE3).
    pub fn with_key(layout: BlockLayout, key: Option<[u8; 32]>) -> Self {
        let zeros = vec![0u8; layout.block_size() as usize];
        let zero_full_blocks = (0..layout.blocks_per_chunk())
            .map(|i| block_cv(key.as_ref(), &zeros, i as u64 * u64::from(layout.block_size())))
            .collect();
        Self {
            layout,
            key,
            zero_full_blocks,
        }
    }

    fn root(&self, data: &[u8]) -> [u8; 32] {
        match &self.key {
            Some(k) => *blake3::keyed_hash(k, data).as_bytes(),
            None => *blake3::hash(data).as_bytes(),
        }
    }

    fn mode(&self) -> Mode<'_> {
        match &self.key {
            Some(k) => Mode::KeyedHash(k),
            None => Mode::Hash,
        }
    }

    /// The block layout.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// Hashes one chunk (`data` is the whole chunk, possibly short at the disk's end).
    pub fn hash_chunk(&self, data: &[u8]) -> ChunkHashes {
        let chunk_len = data.len() as u32;
        let n = self.layout.blocks_in(chunk_len);
        if n <= 1 {
            if is_zero(data) {
                return ChunkHashes {
                    digest: None,
                    blocks: vec![self.root(data)],
                };
            }
            let d = Digest(self.root(data));
            return ChunkHashes {
                digest: Some(d),
                blocks: vec![d.0],
            };
        }
        let mut all_zero = true;
        let block_size = self.layout.block_size();
        let blocks: Vec<ChainingValue> = (0..n)
            .map(|i| {
                let range = self.layout.block_range(chunk_len, i);
                let full = range.len() == block_size as usize;
                let bytes = &data[range.clone()];
                if full && is_zero(bytes) {
                    self.zero_full_blocks[i]
                } else {
                    all_zero &= is_zero(bytes);
                    block_cv(self.key.as_ref(), bytes, range.start as u64)
                }
            })
            .collect();
        let digest = if all_zero {
            None
        } else {
            Some(Digest(merge_root(
                &blocks,
                u64::from(block_size),
                u64::from(chunk_len),
                self.mode(),
            )))
        };
        ChunkHashes { digest, blocks }
    }

    /// The value of block `index` of a chunk of `chunk_len` bytes, as [`BlockHasher::hash_chunk`]
    /// computes it; `chunk` holds the chunk's bytes, of which only block `index` is read (the
    /// rest may be anything). Lets a sync that knows which blocks changed hash only those.
    pub fn block_value(&self, chunk: &[u8], chunk_len: u32, index: usize) -> [u8; 32] {
        if self.layout.blocks_in(chunk_len) <= 1 {
            return self.root(&chunk[..chunk_len as usize]);
        }
        let range = self.layout.block_range(chunk_len, index);
        let bytes = &chunk[range.clone()];
        if range.len() == self.layout.block_size() as usize && is_zero(bytes) {
            return self.zero_full_blocks[index];
        }
        block_cv(self.key.as_ref(), bytes, range.start as u64)
    }

    /// The block values of an all-zero chunk of `chunk_len` bytes.
    pub fn zero_values(&self, chunk_len: u32) -> Vec<[u8; 32]> {
        let n = self.layout.blocks_in(chunk_len);
        if n > 1 && chunk_len == self.layout.chunk_size() {
            return self.zero_full_blocks.clone();
        }
        self.hash_chunk(&vec![0u8; chunk_len as usize]).blocks
    }

    /// The chunk digest from block values computed by [`BlockHasher::hash_chunk`] for a chunk of
    /// `chunk_len` bytes (not meaningful for zero chunks, whose digest is `None`).
    pub fn digest_from_blocks(&self, blocks: &[[u8; 32]], chunk_len: u32) -> Digest {
        if blocks.len() == 1 {
            return Digest(blocks[0]);
        }
        Digest(merge_root(
            blocks,
            u64::from(self.layout.block_size()),
            u64::from(chunk_len),
            self.mode(),
        ))
    }
}

fn block_cv(key: Option<&[u8; 32]>, bytes: &[u8], offset: u64) -> ChainingValue {
    let mut h = match key {
        Some(k) => blake3::Hasher::new_keyed(k),
        None => blake3::Hasher::new(),
    };
    h.set_input_offset(offset);
    h.update(bytes);
    h.finalize_non_root()
}

/// Merges the chaining values of consecutive blocks covering `len` bytes into the root hash,
/// following BLAKE3's tree shape (the left subtree holds the largest power of two of 1 KiB
/// chunks that is smaller than the input).
fn merge_root(cvs: &[ChainingValue], block: u64, len: u64, mode: Mode<'_>) -> [u8; 32] {
    let left = left_subtree_len(len);
    let split = (left / block) as usize;
    let l = merge_inner(&cvs[..split], block, left, mode);
    let r = merge_inner(&cvs[split..], block, len - left, mode);
    *merge_subtrees_root(&l, &r, mode).as_bytes()
}

fn merge_inner(cvs: &[ChainingValue], block: u64, len: u64, mode: Mode<'_>) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let split = (left / block) as usize;
    let l = merge_inner(&cvs[..split], block, left, mode);
    let r = merge_inner(&cvs[split..], block, len - left, mode);
    merge_subtrees_non_root(&l, &r, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4097]));
        let mut v = vec![0u8; 70_000];
        v[69_999] = 1;
        assert!(!is_zero(&v));
        v[69_999] = 0;
        v[3] = 0x80;
        assert!(!is_zero(&v));
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"tern");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The merged block values equal the plain BLAKE3 hash of the chunk, for every block
        /// size, chunk length (including short last chunks) and mix of zero and data blocks.
        #[test]
        fn merged_blocks_equal_plain_hash(
            bshift in 12u32..=16, len in 1usize..(256 << 10), seed in any::<u64>(), zero_mask in any::<u64>()
        ) {
            let layout = BlockLayout::new(64 << 10, 1 << bshift.min(16)).unwrap();
            let len = len.min(64 << 10).div_ceil(512) * 512;
            let hasher = BlockHasher::new(layout);
            let mut data = vec![0u8; len];
            let mut x = seed | 1;
            for (i, b) in data.iter_mut().enumerate() {
                let blk = i / layout.block_size() as usize;
                if zero_mask >> (blk % 64) & 1 == 1 {
                    continue;
                }
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                *b = x as u8;
            }
            let h = hasher.hash_chunk(&data);
            if is_zero(&data) {
                prop_assert_eq!(h.digest, None);
            } else {
                prop_assert_eq!(h.digest, Some(Digest::of(&data)));
                prop_assert_eq!(hasher.digest_from_blocks(&h.blocks, len as u32), Digest::of(&data));
            }
            prop_assert_eq!(h.blocks.len(), layout.blocks_in(len as u32));
            // Block by block, the same values, whatever the other blocks hold.
            let mut noisy = data.clone();
            for (i, v) in h.blocks.iter().enumerate() {
                let r = layout.block_range(len as u32, i);
                if h.blocks.len() > 1 {
                    // Scribble over the other blocks: they must not matter.
                    for (j, b) in noisy.iter_mut().enumerate() {
                        if !r.contains(&j) {
                            *b = 0x5a;
                        }
                    }
                }
                prop_assert_eq!(&hasher.block_value(&noisy, len as u32, i), v);
                noisy.copy_from_slice(&data);
            }
            prop_assert_eq!(hasher.zero_values(len as u32), hasher.hash_chunk(&vec![0u8; len]).blocks);

            // Keyed (object mode with encryption): equal to keyed BLAKE3 of the chunk.
            let key = [seed as u8; 32];
            let keyed = BlockHasher::with_key(layout, Some(key));
            let k = keyed.hash_chunk(&data);
            if !is_zero(&data) {
                let want = Digest(*blake3::keyed_hash(&key, &data).as_bytes());
                prop_assert_eq!(k.digest, Some(want));
                prop_assert_eq!(keyed.digest_from_blocks(&k.blocks, len as u32), want);
            }
        }
    }

    #[test]
    fn changed_block_changes_only_its_value() {
        let layout = BlockLayout::new(4 << 20, 64 << 10).unwrap();
        let hasher = BlockHasher::new(layout);
        let mut data = vec![7u8; 4 << 20];
        let a = hasher.hash_chunk(&data);
        data[(64 << 10) * 5 + 17] ^= 1;
        let b = hasher.hash_chunk(&data);
        let changed: Vec<usize> = (0..a.blocks.len())
            .filter(|&i| a.blocks[i] != b.blocks[i])
            .collect();
        assert_eq!(changed, vec![5]);
        assert_eq!(b.digest, Some(Digest::of(&data)));
        // Zero blocks take the precomputed path and still merge to the right digest.
        let mut z = vec![0u8; 4 << 20];
        z[0] = 1;
        assert_eq!(hasher.hash_chunk(&z).digest, Some(Digest::of(&z)));
    }
}

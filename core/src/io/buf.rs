//! [`AlignedBuf`]: a plain owned, 4096-aligned heap buffer for O_DIRECT reads outside a volume.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::{fmt, slice};

use super::arena::map_anonymous;

/// Alignment of every [`AlignedBuf`].
pub const ALIGN: usize = 4096;

/// Buffers of at least this many bytes are mapped with `mmap` instead of taken from the heap.
const MMAP_MIN: usize = 1 << 20;

/// An owned, zero-initialized heap buffer whose start is 4096-aligned (good for O_DIRECT on any
/// device). Implements `AsRef<[u8]>`, so it can become a `bytes::Bytes` with `Bytes::from_owner`
/// without a copy.
///
/// Large buffers (chunk buffers: 1 MiB and more) are anonymous mappings: the kernel zero-fills
/// a page only when it is first touched. The heap path would zero every byte up front (an
/// over-aligned `alloc_zeroed` is `posix_memalign` + `memset`), which cost a tenth of the
/// agent's CPU in an incremental sync that reads 128 KiB of each 4 MiB chunk buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Length the buffer was allocated with (the allocation's layout derives from it).
    cap: usize,
    /// Whether the memory is an anonymous mapping of `cap` bytes (else a heap allocation).
    mapped: bool,
}

// SAFETY: `AlignedBuf` uniquely owns its heap allocation, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only hand out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        // `len.max(1)`: a zero-size allocation is not allowed. Sizes near `isize::MAX` cannot
        // be allocated anyway: treat them as an allocation failure.
        Layout::from_size_align(len.max(1), ALIGN).unwrap_or(Layout::new::<[u8; ALIGN]>())
    }

    /// A buffer of `len` zero bytes. Aborts like `Vec` if memory is exhausted.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        if layout.size() < len {
            alloc::handle_alloc_error(layout);
        }
        if len >= MMAP_MIN {
            // Mappings are page-aligned (at least ALIGN) and read as zeros.
            let Ok(ptr) = map_anonymous(len, libc::PROT_READ | libc::PROT_WRITE) else {
                alloc::handle_alloc_error(layout)
            };
            return AlignedBuf {
                ptr,
                len,
                cap: len,
                mapped: true,
            };
        }
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            cap: len,
            mapped: false,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `n` bytes (no effect if `n >= len`); the memory is kept.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: `ptr` is the start of a mapping of exactly `cap` bytes made in `zeroed`
            // and owned by `self` alone. A failure can only leak the mapping.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
            return;
        }
        let layout = Self::layout(self.cap);
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout (`cap` never changes).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to at least `len` initialized (zeroed) bytes owned by `self`.
        unsafe { slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees exclusive access.
        unsafe { slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

//! The per-volume buffer arena and the [`IoBuf`] handles carved from it.
//!
//! One anonymous, page-aligned mapping of `buffer_bytes` per volume: the io_uring engine registers
//! it as a single fixed buffer, so `READ_FIXED`/`WRITE_FIXED` can name any sub-range. The mapping
//! is not written up front (anonymous pages are zero until touched; registering the arena with
//! io_uring does pin it, which faults the pages in).
//!
//! Sub-allocation: `buddy_system_allocator::FrameAllocator` in 4 KiB frames (a request takes the
//! next power of two of its frame count). The crate fits with two workarounds, both handled by
//! numbering our frames from [`FRAME_BASE`] and using an [`ORDER`] larger than any arena:
//! `add_frame` starting at frame 0 would cap the first blocks at 32 frames, and `dealloc` drops
//! a merged block that reaches the highest order. With frames numbered from 2^19 and at most
//! 2^18 frames (1 GiB), no block ever reaches order 19.
//!
//! Waiting: when a request does not fit, [`Alloc`] queues behind earlier waiters (strict FIFO,
//! so a 4 MiB request is not starved by a stream of 4 KiB ones) and is woken when memory returns.
//! A request for several buffers ([`Arena::alloc_many`]) takes all of them or none, so no one
//! waits while holding part of what it needs.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::{fmt, slice};

use buddy_system_allocator::FrameAllocator;

use super::IoError;
use super::config::MAX_IO_BUF;

/// Allocation granule: one 4 KiB page.
pub(crate) const FRAME: usize = 4096;
/// Frame allocator order: blocks of up to 2^19 frames, more than any arena holds (see above).
const ORDER: usize = 20;
/// First frame number handed to the allocator (frame numbers are offset by it).
const FRAME_BASE: usize = 1 << (ORDER - 1);

/// A volume's buffer arena.
pub(crate) struct Arena {
    base: NonNull<u8>,
    bytes: usize,
    /// Largest buffer this arena can ever hand out.
    max_len: usize,
    state: Mutex<State>,
}

// SAFETY: the arena is a plain memory mapping plus a mutex-protected allocator; the bytes of
// each allocated range are only reached through the one `IoBuf` that owns the range.
unsafe impl Send for Arena {}
// SAFETY: as above; shared access only reads `base`/`bytes` and locks `state`.
unsafe impl Sync for Arena {}

struct State {
    frames: FrameAllocator<ORDER>,
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

struct Waiter {
    ticket: u64,
    waker: Waker,
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("base", &self.base)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Arena {
    /// Maps `bytes` (a positive multiple of 4096, at most 1 GiB) of anonymous memory.
    pub(crate) fn new(bytes: usize) -> Result<Arc<Arena>, IoError> {
        if bytes < FRAME || !bytes.is_multiple_of(FRAME) {
            return Err(IoError::Config {
                reason: format!("an arena of {bytes} bytes is not a positive multiple of 4096"),
            });
        }
        let base = map_anonymous(bytes, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(|source| IoError::Arena { bytes, source })?;
        let nframes = bytes / FRAME;
        let mut frames = FrameAllocator::<ORDER>::new();
        frames.add_frame(FRAME_BASE, FRAME_BASE + nframes);
        // The largest block the buddy allocator can ever form is the largest power of two that
        // fits in the arena (blocks never merge past the arena's first block).
        let largest = (1usize << nframes.ilog2()) * FRAME;
        Ok(Arc::new(Arena {
            base,
            bytes,
            max_len: largest.min(MAX_IO_BUF),
            state: Mutex::new(State {
                frames,
                waiters: VecDeque::new(),
                next_ticket: 0,
            }),
        }))
    }

    /// Start of the mapping.
    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Size of the mapping in bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Largest buffer [`Arena::alloc`] accepts.
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every critical section is a
        // single allocator call plus queue bookkeeping.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A future that resolves to a buffer of `len` bytes once the arena has room.
    pub(crate) fn alloc(self: &Arc<Self>, len: usize) -> Result<AllocOne, IoError> {
        self.alloc_many(&[len]).map(AllocOne)
    }

    /// A future that resolves to one buffer per entry of `lens`, in that order, once the arena
    /// has room for all of them at once. Taking them together means a caller never holds some
    /// buffers while it waits for the others, which could deadlock callers that share an arena.
    pub(crate) fn alloc_many(self: &Arc<Self>, lens: &[usize]) -> Result<Alloc, IoError> {
        // Each request takes a power of two of frames; together they fit in an empty arena
        // when their sum fits in its largest block (allocated largest first, see `poll`).
        let blocks: usize = lens.iter().map(|l| l.div_ceil(FRAME).next_power_of_two()).sum();
        let len: usize = lens.iter().sum();
        if blocks * FRAME > self.max_len {
            return Err(IoError::BufferTooLarge {
                len,
                max: self.max_len,
            });
        }
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        Ok(Alloc {
            arena: Arc::clone(self),
            lens: lens.to_vec(),
            order,
            ticket: None,
        })
    }

    /// Buffer of `len` bytes right now, or `None` when the arena is full or others are waiting.
    #[cfg(test)]
    pub(crate) fn try_alloc(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        let frames = len.div_ceil(FRAME);
        let mut st = self.lock();
        if !st.waiters.is_empty() {
            return None;
        }
        let first = if frames == 0 {
            FRAME_BASE
        } else {
            st.frames.alloc(frames)?
        };
        drop(st);
        Some(IoBuf {
            arena: Arc::clone(self),
            frame: first - FRAME_BASE,
            frames,
            len,
        })
    }

    fn release(&self, frame: usize, frames: usize) {
        if frames == 0 {
            return;
        }
        let waker = {
            let mut st = self.lock();
            st.frames.dealloc(frame + FRAME_BASE, frames);
            st.waiters.front().map(|w| w.waker.clone())
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base`/`bytes` are exactly the mapping made in `new`; every `IoBuf` and every
        // engine holds an `Arc<Arena>`, so nothing refers to the mapping any more.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
        debug_assert_eq!(rc, 0, "munmap of the I/O arena failed");
    }
}

/// Future returned by [`Arena::alloc_many`]: waits, in FIFO order, for room in the arena.
pub(crate) struct Alloc {
    arena: Arc<Arena>,
    /// The buffer lengths asked for.
    lens: Vec<usize>,
    /// Indexes of `lens`, largest first: the order the frames are taken in.
    order: Vec<usize>,
    /// Our place in the wait queue once we had to wait.
    ticket: Option<u64>,
}

impl fmt::Debug for Alloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alloc")
            .field("lens", &self.lens)
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

/// Takes frames for every length of `lens` (in `order`), or none: `None` when they do not all
/// fit now. The first frame of each, by index of `lens` (0 frames: no frame).
fn take_frames(st: &mut State, lens: &[usize], order: &[usize]) -> Option<Vec<usize>> {
    let mut firsts = vec![FRAME_BASE; lens.len()];
    for (n, &i) in order.iter().enumerate() {
        let frames = lens[i].div_ceil(FRAME);
        if frames == 0 {
            continue;
        }
        match st.frames.alloc(frames) {
            Some(first) => firsts[i] = first,
            None => {
                for &j in &order[..n] {
                    let taken = lens[j].div_ceil(FRAME);
                    if taken > 0 {
                        st.frames.dealloc(firsts[j], taken);
                    }
                }
                return None;
            }
        }
    }
    Some(firsts)
}

impl Future for Alloc {
    type Output = Vec<IoBuf>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<IoBuf>> {
        let this = &mut *self;
        let mut st = this.arena.lock();
        let at_head = match this.ticket {
            None => st.waiters.is_empty(),
            Some(t) => st.waiters.front().is_some_and(|w| w.ticket == t),
        };
        if at_head && let Some(firsts) = take_frames(&mut st, &this.lens, &this.order) {
            let mut next = None;
            if this.ticket.take().is_some() {
                st.waiters.pop_front();
                // The next waiter may fit in what is left.
                next = st.waiters.front().map(|w| w.waker.clone());
            }
            drop(st);
            if let Some(w) = next {
                w.wake();
            }
            let bufs = this
                .lens
                .iter()
                .zip(firsts)
                .map(|(&len, first)| IoBuf {
                    arena: Arc::clone(&this.arena),
                    frame: first - FRAME_BASE,
                    frames: len.div_ceil(FRAME),
                    len,
                })
                .collect();
            return Poll::Ready(bufs);
        }
        match this.ticket {
            None => {
                let ticket = st.next_ticket;
                st.next_ticket += 1;
                st.waiters.push_back(Waiter {
                    ticket,
                    waker: cx.waker().clone(),
                });
                this.ticket = Some(ticket);
            }
            Some(t) => {
                if let Some(w) = st.waiters.iter_mut().find(|w| w.ticket == t) {
                    w.waker.clone_from(cx.waker());
                }
            }
        }
        Poll::Pending
    }
}

/// Future returned by [`Arena::alloc`]: [`Alloc`] for one buffer.
#[derive(Debug)]
pub(crate) struct AllocOne(Alloc);

impl Future for AllocOne {
    type Output = IoBuf;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoBuf> {
        Pin::new(&mut self.0).poll(cx).map(|bufs| {
            bufs.into_iter()
                .next()
                .expect("an allocation of one length yields one buffer")
        })
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        let next = {
            let mut st = self.arena.lock();
            let was_head = st.waiters.front().is_some_and(|w| w.ticket == t);
            st.waiters.retain(|w| w.ticket != t);
            if was_head {
                st.waiters.front().map(|w| w.waker.clone())
            } else {
                None
            }
        };
        if let Some(w) = next {
            w.wake();
        }
    }
}

/// An owned I/O buffer of exactly `len` bytes from a volume's arena.
///
/// Moved into the engine while an operation is in flight and handed back with its completion;
/// its memory returns to the arena when it is dropped. A fresh buffer holds whatever its memory
/// last held (zeros at first): callers fill it before writing it.
pub struct IoBuf {
    arena: Arc<Arena>,
    /// First frame, counted from the arena's start.
    frame: usize,
    /// Frames taken from the allocator (0 for an empty buffer, which owns nothing).
    frames: usize,
    len: usize,
}

// SAFETY: an `IoBuf` exclusively owns its frames of the arena; the arena itself is Send + Sync.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give `&[u8]` access to memory no one else can reach.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `n` bytes (no effect if `n >= len`). The memory stays allocated
    /// until the buffer is dropped.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Byte offset of the buffer in its arena.
    pub(crate) fn arena_offset(&self) -> usize {
        self.frame * FRAME
    }

    /// Whether this buffer comes from `arena`.
    pub(crate) fn is_from(&self, arena: &Arc<Arena>) -> bool {
        Arc::ptr_eq(&self.arena, arena)
    }

    fn ptr(&self) -> *mut u8 {
        // In bounds: `frame * FRAME + len` lies within the mapping (an empty buffer points at
        // the arena's start).
        self.arena.base().wrapping_add(self.arena_offset())
    }

    /// Pointer to byte `at` of the buffer, for the kernel. The caller keeps the buffer alive
    /// (and untouched) until the operation completes.
    pub(crate) fn raw_at(&mut self, at: usize) -> *mut u8 {
        debug_assert!(at <= self.len);
        self.ptr().wrapping_add(at)
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes from `ptr()` lie inside the mapping (initialized: anonymous
        // memory reads as zero until written) and belong to this buffer alone.
        unsafe { slice::from_raw_parts(self.ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access.
        unsafe { slice::from_raw_parts_mut(self.ptr(), self.len) }
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("offset", &self.arena_offset())
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        self.arena.release(self.frame, self.frames);
    }
}

/// Length of the shared zero region used when zeroing must fall back to writes.
pub(crate) const ZERO_LEN: usize = 1 << 20;

/// A new private anonymous mapping of `len` bytes with protection `prot`: page-aligned, and
/// zero-filled by the kernel page by page when first touched. The caller owns it (`munmap`).
pub(crate) fn map_anonymous(len: usize, prot: libc::c_int) -> io::Result<NonNull<u8>> {
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; no existing
    // memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// A read-only, page-aligned region of [`ZERO_LEN`] zero bytes, mapped once and never unmapped.
/// Read-only anonymous pages all map the kernel's zero page: it costs no memory.
pub(crate) fn zeroes() -> io::Result<&'static [u8]> {
    static ZEROES: OnceLock<Result<&'static [u8], i32>> = OnceLock::new();
    let r = ZEROES.get_or_init(|| {
        let ptr =
            map_anonymous(ZERO_LEN, libc::PROT_READ).map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?;
        // SAFETY: the mapping is ZERO_LEN readable bytes, zero-filled, never written (read-only)
        // and never unmapped, so a `'static` shared slice over it is valid.
        Ok(unsafe { slice::from_raw_parts(ptr.as_ptr().cast_const(), ZERO_LEN) })
    });
    r.map_err(io::Error::from_raw_os_error)
}

//! Reuse of the 4 KiB-aligned chunk buffers the agent reads into.
//!
//! Every chunk is read into an aligned buffer that then travels to the HTTP client as the body
//! of its extents. Allocating a fresh 4 MiB buffer per chunk costs page faults and zeroing on
//! every chunk; the pool hands buffers back when the last extent of a chunk is sent. It keeps at
//! most a fixed number of free buffers: more chunks than that can be in flight when each holds
//! little data (an incremental reads only the changed ranges), and their extra buffers, of
//! which only the pages read into were touched, are unmapped when they come back.

use std::sync::{Arc, Mutex};

use tern_core::io::AlignedBuf;

/// A pool of buffers of one length.
#[derive(Debug)]
pub struct BufPool {
    len: usize,
    max_free: usize,
    free: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    /// A pool of `len`-byte buffers that keeps at most `max_free` of them for reuse.
    pub fn new(len: usize, max_free: usize) -> Arc<Self> {
        Arc::new(Self {
            len,
            max_free,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of the pool's length. Its content is whatever it held last: callers fill it.
    pub fn get(self: &Arc<Self>) -> PooledBuf {
        let buf = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let buf = buf.unwrap_or_else(|| AlignedBuf::zeroed(self.len));
        PooledBuf {
            buf: Some(buf),
            len: self.len,
            pool: self.clone(),
        }
    }
}

/// A buffer that returns to its pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Arc<BufPool>,
}

impl PooledBuf {
    /// Shortens the visible length (the whole buffer goes back to the pool).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[][..], |b| &b[..self.len])
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.buf.as_deref_mut().map_or(&mut [][..], |b| &mut b[..len])
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
            if free.len() < self.pool.max_free {
                free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let pool = BufPool::new(8192, 1);
        let mut a = pool.get();
        a[0] = 7;
        let ptr = a.as_ptr();
        drop(a);
        let mut b = pool.get();
        assert_eq!(b.as_ptr(), ptr);
        b.truncate(100);
        assert_eq!(b.len(), 100);
        let c = pool.get();
        assert_ne!(c.as_ptr(), ptr);
        // Only one is kept: the second one back is freed.
        drop((b, c));
        assert_eq!(pool.free.lock().unwrap_or_else(|p| p.into_inner()).len(), 1);
    }
}

//! The shared slot array (`names::TABLE`: every VIP's selection table, each in its own range),
//! mapped into this process's memory.
//!
//! The map is created with `BPF_F_MMAPABLE`, so its values live in pages both the kernel and
//! `lb` map: reading a VIP's 65537 slots is a memory copy, and writing a changed slot is one
//! aligned 32-bit store, which a packet reading the slot sees whole (old or new value, never a
//! mix) — where a map syscall per slot cost ~1.5 µs, ~100 ms for a table. The order of writes
//! (`state.rs`) is what keeps every slot valid while a table changes.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context};
use aya::maps::{Map, MapData, MapError};

/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Bytes between slots in the mapping: the kernel stores an array's values 8-byte aligned
/// (`round_up(value_size, 8)`), a 4-byte slot in the first half of its element.
const ELEM_SIZE: usize = 8;

/// The slot array, mapped.
pub struct SlotArray {
    /// Kept open for as long as the mapping.
    _map: MapData,
    base: NonNull<AtomicU32>,
    len: u32,
    mapped: usize,
}

// SAFETY: the mapping is plain shared memory accessed through atomics only.
unsafe impl Send for SlotArray {}
unsafe impl Sync for SlotArray {}

impl SlotArray {
    /// Maps the array map `map` (u32 values, `BPF_F_MMAPABLE`).
    pub fn new(map: Map) -> anyhow::Result<SlotArray> {
        let Map::Array(map) = map else {
            bail!("the slot array is not an array map");
        };
        let info = map.info().context("slot array info")?;
        if info.value_size() != 4 || info.key_size() != 4 {
            bail!(
                "the slot array has {}-byte keys and {}-byte values (want 4 and 4)",
                info.key_size(),
                info.value_size()
            );
        }
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            bail!("the slot array was not made mappable (BPF_F_MMAPABLE)");
        }
        let len = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped = (len as usize * ELEM_SIZE).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of the map's value pages, which the kernel sizes to at least
        // `mapped` bytes for an mmapable array of `len` elements of `ELEM_SIZE` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the slot array");
        }
        Ok(SlotArray {
            _map: map,
            base: NonNull::new(p.cast()).context("mmap returned null")?,
            len,
            mapped,
        })
    }

    /// Number of slots.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the array has no slots.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, index: u32) -> Result<&AtomicU32, MapError> {
        if index >= self.len {
            return Err(MapError::OutOfBounds {
                index,
                max_entries: self.len,
            });
        }
        // SAFETY: in bounds, aligned (page-aligned base, 8-byte elements), live while self is.
        Ok(unsafe { &*self.base.as_ptr().add(index as usize * (ELEM_SIZE / 4)) })
    }

    /// Slot `index`.
    pub fn get(&self, index: u32) -> Result<u32, MapError> {
        Ok(self.slot(index)?.load(Ordering::Relaxed))
    }

    /// Writes slot `index`: one store, which packets see whole. Release: whoever reads the new
    /// value also sees every slot written before it.
    pub fn set(&self, index: u32, value: u32) -> Result<(), MapError> {
        self.slot(index)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Slots `off .. off + len`.
    pub fn range(&self, off: u32, len: u32) -> Result<Vec<u32>, MapError> {
        let end = off.checked_add(len).filter(|e| *e <= self.len);
        let Some(end) = end else {
            return Err(MapError::OutOfBounds {
                index: off.saturating_add(len).saturating_sub(1),
                max_entries: self.len,
            });
        };
        (off..end).map(|i| self.get(i)).collect()
    }
}

impl Drop for SlotArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}

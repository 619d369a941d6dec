//! The synchronisation the table is built on: std's atomics, or loom's when the table is
//! model-checked (`RUSTFLAGS="--cfg loom"`, tests/loom.rs), which explores the interleavings of
//! their operations and the outcomes of them it models (not load buffering; SeqCst as AcqRel). The one non-atomic field, a
//! place's key, is a [`KeyCell`] for the same reason: loom checks each of its reads and writes
//! against the others.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU8, AtomicUsize, Ordering};

use crate::Key;

/// A place's key: written only by the holder of the place's claim or by an exclusive holder
/// (see the crate's rules), read by whoever has seen the place published.
#[repr(transparent)]
pub struct KeyCell(#[cfg(not(loom))] std::cell::UnsafeCell<Key>, #[cfg(loom)] loom::cell::UnsafeCell<Key>);

impl KeyCell {
    #[cfg(loom)]
    pub fn new(key: Key) -> Self {
        KeyCell(loom::cell::UnsafeCell::new(key))
    }

    /// # Safety
    /// No one writes the key meanwhile (the crate's rules: the caller loaded the place's HELD
    /// state with acquire ordering, or holds the table exclusively).
    pub unsafe fn read(&self) -> Key {
        #[cfg(not(loom))]
        // SAFETY: the caller's promise.
        return unsafe { *self.0.get() };
        #[cfg(loom)]
        // SAFETY: the caller's promise, which loom checks.
        return self.0.with(|key| unsafe { *key });
    }

    /// # Safety
    /// No one else reads or writes the key meanwhile (the caller holds the place's claim, not yet
    /// published, or the table exclusively).
    pub unsafe fn write(&self, key: Key) {
        #[cfg(not(loom))]
        // SAFETY: the caller's promise.
        unsafe {
            self.0.get().write(key)
        };
        #[cfg(loom)]
        // SAFETY: the caller's promise, which loom checks.
        self.0.with_mut(|place| unsafe { place.write(key) });
    }
}

/// Let the claimant of a place run: on a machine, spin (`spin`) or yield; under loom, yield to
/// the model's scheduler at once (a spin would explore nothing new).
#[cfg(loom)]
pub fn pause(_spin: bool) {
    loom::thread::yield_now();
}

#[cfg(not(loom))]
pub fn pause(spin: bool) {
    if spin {
        std::hint::spin_loop();
    } else {
        // The claimant may be descheduled on this very core: give it the processor.
        std::thread::yield_now();
    }
}

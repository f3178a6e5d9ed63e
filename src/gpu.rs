//! Precision and CUDA streams: what tch does not expose, through the C++ shim
//! (`src/shim/uamt_torch.cpp`, built against libtorch by `src/build.rs`).
//!
//! - [`Autocast`]: bfloat16 autocast on the calling thread for the duration of a guard (libtorch's
//!   autocast state is thread-local, so every stage thread enters its own).
//! - [`set_tf32`]: TF32 for cuDNN convolutions and cuBLAS matmuls (process-wide).
//! - [`OwnStream`]: gives the calling thread a CUDA stream of its own from libtorch's pool, so the
//!   pipeline's stages queue their work on different streams and can overlap on the device.
//! - [`Ready`]: the hand-off between streams. The producer marks a message `Ready::now` after
//!   queueing the work that makes its tensors; the consumer calls [`Ready::wait`], which makes
//!   its own stream wait for that work on the device (an event, not a device-wide or host
//!   synchronisation) and tells the caching allocator that its stream uses the tensors.
//!
//! [`cuda_total_memory`]: a card's memory, for planning.
//!
//! Streams are used only once [`enable_streams`] is called (the pipeline does on CUDA); until then
//! every function here is a no-op for streams and all work stays on libtorch's default stream.

use crate::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Tensor};

extern "C" {
    fn uamt_last_error() -> *const c_char;
    fn uamt_autocast_enter(cuda: c_int, was: *mut c_int) -> c_int;
    fn uamt_autocast_exit(cuda: c_int, was: c_int) -> c_int;
    fn uamt_autocast_enabled(cuda: c_int, on: *mut c_int) -> c_int;
    fn uamt_set_tf32(on: c_int) -> c_int;
    fn uamt_tf32_enabled(on: *mut c_int) -> c_int;
    fn uamt_stream_from_pool(device: c_int, id: *mut i64) -> c_int;
    fn uamt_stream_set_current(device: c_int, id: i64, previous: *mut i64) -> c_int;
    fn uamt_stream_current(device: c_int, id: *mut i64) -> c_int;
    fn uamt_stream_synchronize(device: c_int, id: i64) -> c_int;
    fn uamt_event_record(device: c_int, stream: i64, event: *mut *mut c_void) -> c_int;
    fn uamt_event_block(event: *mut c_void, device: c_int, stream: i64) -> c_int;
    fn uamt_event_free(event: *mut c_void);
    fn uamt_tensor_record_stream(tensor: *mut c_void, device: c_int, stream: i64) -> c_int;
    fn uamt_cuda_memory(device: c_int, free: *mut u64, total: *mut u64) -> c_int;
}

/// The total memory of CUDA device `index` in bytes (the card's, as the driver reports it). An
/// error where libtorch sees no such device.
pub fn cuda_total_memory(index: usize) -> Result<u64> {
    let count = crate::cuda::cuda_device_count();
    if index >= count {
        return Err(Error::invalid(
            "device",
            format!("cuda:{index} asked for, but libtorch sees {count} CUDA device(s)"),
        ));
    }
    let (mut free, mut total) = (0u64, 0u64);
    // SAFETY: plain out-parameters; the shim catches every C++ exception.
    check(unsafe { uamt_cuda_memory(index as c_int, &mut free, &mut total) }, "reading the CUDA device's memory")?;
    Ok(total)
}

/// Numeric precision of the forward and backward passes (`device.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// fp32 with libtorch's defaults, as the reference runs (cuDNN may use TF32 for
    /// convolutions on Ampere and newer; matmuls stay fp32).
    Fp32,
    /// TF32 tensor cores for cuDNN convolutions and cuBLAS matmuls (CUDA only).
    Tf32,
    /// bfloat16 autocast: convolutions in bf16, BatchNorm, softmax, the losses, the weights and
    /// the optimiser in fp32 (CUDA, where it pays; also runs on the CPU).
    Bf16,
}

/// Turns a shim status into a result naming `what`.
fn check(rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim keeps a NUL-terminated thread-local message.
    let msg = unsafe { CStr::from_ptr(uamt_last_error()) }.to_string_lossy();
    let first = msg.lines().next().unwrap_or("").to_string();
    Err(Error::invalid("device", format!("{what}: {first}")))
}

fn cuda_index(device: Device) -> Option<c_int> {
    match device {
        Device::Cuda(n) => Some(n as c_int),
        _ => None,
    }
}

/// bfloat16 autocast on this thread while the guard lives (nests; not `Send`: the state it
/// restores is this thread's).
#[derive(Debug)]
pub struct Autocast {
    cuda: c_int,
    was: c_int,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Autocast {
    /// Enters bfloat16 autocast for `device`'s type (CUDA or CPU).
    pub fn bf16(device: Device) -> Result<Self> {
        let cuda = device.is_cuda() as c_int;
        let mut was = 0;
        // SAFETY: plain C call; `was` outlives it.
        check(unsafe { uamt_autocast_enter(cuda, &mut was) }, "entering bf16 autocast")?;
        Ok(Autocast { cuda, was, _not_send: std::marker::PhantomData })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: plain C call. It cannot fail once enter succeeded.
        let _ = unsafe { uamt_autocast_exit(self.cuda, self.was) };
    }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    let mut on = 0;
    // SAFETY: plain C call.
    unsafe { uamt_autocast_enabled(device.is_cuda() as c_int, &mut on) == 0 && on != 0 }
}

/// Allows (or forbids) TF32 in cuDNN convolutions and cuBLAS matmuls, process-wide.
pub fn set_tf32(on: bool) -> Result<()> {
    // SAFETY: plain C call.
    check(unsafe { uamt_set_tf32(on as c_int) }, "setting TF32")
}

/// Whether TF32 is allowed for both cuDNN and cuBLAS.
pub fn tf32_enabled() -> bool {
    let mut on = 0;
    // SAFETY: plain C call.
    unsafe { uamt_tf32_enabled(&mut on) == 0 && on != 0 }
}

static STREAMS: AtomicBool = AtomicBool::new(false);

/// Lets [`OwnStream`] and [`Ready`] use CUDA streams (call before the stage threads start).
pub fn enable_streams(on: bool) {
    STREAMS.store(on, Ordering::SeqCst);
}

/// Whether streams are in use.
pub fn streams_enabled() -> bool {
    STREAMS.load(Ordering::SeqCst)
}

/// A CUDA stream: device index and libtorch's stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    device: c_int,
    id: i64,
}

impl Stream {
    /// The calling thread's current stream on `device` (`None` off CUDA).
    pub fn current(device: Device) -> Result<Option<Stream>> {
        let Some(d) = cuda_index(device) else { return Ok(None) };
        let mut id = 0;
        // SAFETY: plain C call.
        check(unsafe { uamt_stream_current(d, &mut id) }, "querying the current CUDA stream")?;
        Ok(Some(Stream { device: d, id }))
    }

    /// Blocks the host until the work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: plain C call.
        check(unsafe { uamt_stream_synchronize(self.device, self.id) }, "synchronising a CUDA stream")
    }
}

/// The calling thread's own stream while the guard lives; on drop the stream is synchronised and
/// the previous one made current again. A no-op off CUDA or with streams off.
#[derive(Debug)]
pub struct OwnStream {
    stream: Option<(Stream, i64)>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl OwnStream {
    /// Takes a stream from libtorch's pool for `device` and makes it current on this thread.
    pub fn new(device: Device) -> Result<Self> {
        let stream = match cuda_index(device) {
            Some(d) if streams_enabled() => {
                let (mut id, mut previous) = (0, 0);
                // SAFETY: plain C calls.
                check(unsafe { uamt_stream_from_pool(d, &mut id) }, "taking a CUDA stream from the pool")?;
                check(unsafe { uamt_stream_set_current(d, id, &mut previous) }, "making a CUDA stream current")?;
                Some((Stream { device: d, id }, previous))
            }
            _ => None,
        };
        Ok(OwnStream { stream, _not_send: std::marker::PhantomData })
    }

    /// The stream, if this guard made one current.
    pub fn stream(&self) -> Option<Stream> {
        self.stream.map(|(s, _)| s)
    }
}

impl Drop for OwnStream {
    fn drop(&mut self) {
        if let Some((s, previous)) = self.stream.take() {
            let _ = s.synchronize();
            let mut ignored = 0;
            // SAFETY: plain C call.
            let _ = unsafe { uamt_stream_set_current(s.device, previous, &mut ignored) };
        }
    }
}

/// A CUDA event owned by Rust.
#[derive(Debug)]
struct Event(*mut c_void);

// SAFETY: a CUDA event may be waited on from any thread; the pointer has a single owner.
unsafe impl Send for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by uamt_event_record, freed once.
        unsafe { uamt_event_free(self.0) }
    }
}

/// Marks the point in the producer's stream after which a message's tensors are complete.
#[derive(Debug, Default)]
pub struct Ready(Option<Event>);

impl Ready {
    /// Records the producer's progress on its current stream (nothing off CUDA or with streams off).
    pub fn now(device: Device) -> Result<Ready> {
        if !streams_enabled() {
            return Ok(Ready(None));
        }
        let Some(s) = Stream::current(device)? else { return Ok(Ready(None)) };
        let mut ev = std::ptr::null_mut();
        // SAFETY: plain C call; the event is owned by the returned value.
        check(unsafe { uamt_event_record(s.device, s.id, &mut ev) }, "recording a CUDA event")?;
        Ok(Ready(Some(Event(ev))))
    }

    /// Makes the calling thread's current stream wait (on the device) for the producer's work,
    /// and marks `tensors` as used by this stream so their memory is not reused too early.
    pub fn wait<'a>(self, device: Device, tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
        let Some(ev) = self.0 else { return Ok(()) };
        let Some(s) = Stream::current(device)? else { return Ok(()) };
        // SAFETY: plain C calls on a live event and live tensors.
        check(unsafe { uamt_event_block(ev.0, s.device, s.id) }, "waiting for a CUDA event")?;
        for t in tensors {
            if t.device().is_cuda() {
                check(
                    unsafe { uamt_tensor_record_stream(t.as_ptr() as *mut c_void, s.device, s.id) },
                    "record_stream",
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_s_memory_is_read_or_its_absence_reported() {
        match crate::cuda::cuda_device_count() {
            0 => {
                let err = cuda_total_memory(0).unwrap_err().to_string();
                assert!(err.contains("sees 0 CUDA device"), "{err}");
            }
            n => {
                assert!(cuda_total_memory(0).unwrap() > 1 << 30);
                assert!(cuda_total_memory(n).is_err());
            }
        }
    }
}

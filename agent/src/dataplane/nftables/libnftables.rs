//! nft's own library, `libnftables`, run inside the agent: the same parser and
//! netlink code as the `nft` binary without starting a process per transaction, and
//! one long-lived context whose cache of the table's chains and sets survives
//! between transactions (nft re-reads it only when the ruleset generation moved).
//!
//! The library is opened at run time (`dlopen`), not linked, so the agent still starts
//! on hosts without it (eBPF and iptables modes need nothing of nftables) and falls
//! back to the binary there. Full syncs run the binary (see [`super::exec::Session`]).
//! Measured here at 10,000 services / 100,000 endpoints (`cargo xtask bench --only
//! scale`): one endpoint change to programmed 14 ms p50 / 23 ms p99 in process,
//! 32 ms / 57 ms through `nft -f -` (the process start, and nft re-reading the
//! table's chains and sets for every transaction).

use std::ffi::{CStr, CString, c_char, c_int, c_void};

use libloading::Library;

use super::exec::NftError;

/// The soname Debian, Fedora and Alpine ship (libnftables 0.9.x and 1.x).
const SONAME: &str = "libnftables.so.1";

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The functions of `libnftables.h` Ferry calls.
struct Api {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_error_buffer: CtxGetBuffer,
    run_cmd_from_buffer: RunCmd,
    /// Keeps the function pointers above valid; dropped last.
    _library: Library,
}

impl Api {
    fn load() -> Result<Self, libloading::Error> {
        // SAFETY: loading libnftables runs no initialisers with preconditions, and
        // each symbol is cast to its prototype in libnftables.h.
        unsafe {
            let library = Library::new(SONAME)?;
            Ok(Self {
                ctx_new: *library.get::<CtxNew>(b"nft_ctx_new\0")?,
                ctx_free: *library.get::<CtxFree>(b"nft_ctx_free\0")?,
                buffer_output: *library.get::<CtxBuffer>(b"nft_ctx_buffer_output\0")?,
                buffer_error: *library.get::<CtxBuffer>(b"nft_ctx_buffer_error\0")?,
                get_error_buffer: *library.get::<CtxGetBuffer>(b"nft_ctx_get_error_buffer\0")?,
                run_cmd_from_buffer: *library.get::<RunCmd>(b"nft_run_cmd_from_buffer\0")?,
                _library: library,
            })
        }
    }

    /// A new context (`NFT_CTX_DEFAULT`) whose output and errors go to buffers.
    fn context(&self) -> Result<*mut c_void, NftError> {
        // SAFETY: nft_ctx_new takes flags only; the buffer calls take the context it
        // returned, checked non-null.
        unsafe {
            let ctx = (self.ctx_new)(0);
            if ctx.is_null() {
                return Err(NftError::Refused("nft_ctx_new failed".into()));
            }
            (self.buffer_output)(ctx);
            (self.buffer_error)(ctx);
            Ok(ctx)
        }
    }

    /// Runs `script` (one transaction) in `ctx`.
    fn run(&self, ctx: *mut c_void, script: &str) -> Result<(), NftError> {
        let script = CString::new(script)
            .map_err(|_| NftError::Output("an nft script contains a NUL byte".into()))?;
        // SAFETY: ctx is a live context of this library (see `context`); the script
        // is NUL-terminated and outlives the call; the error buffer is a
        // NUL-terminated string owned by ctx, copied before ctx is used again.
        unsafe {
            if (self.run_cmd_from_buffer)(ctx, script.as_ptr()) == 0 {
                return Ok(());
            }
            let error = (self.get_error_buffer)(ctx);
            let message = if error.is_null() {
                String::new()
            } else {
                CStr::from_ptr(error).to_string_lossy().trim().to_owned()
            };
            Err(NftError::Refused(super::exec::truncated(message)))
        }
    }
}

/// libnftables with the context partial syncs share.
pub struct Libnftables {
    api: Api,
    ctx: *mut c_void,
}

// SAFETY: a context is not shared: the data plane that owns this value is driven by
// one thread at a time (the proxy loop), and libnftables keeps no thread-local state.
unsafe impl Send for Libnftables {}

impl Libnftables {
    /// Opens the library and its long-lived context.
    pub fn open() -> Result<Self, String> {
        let api = Api::load().map_err(|e| e.to_string())?;
        let ctx = api.context().map_err(|e| e.to_string())?;
        Ok(Self { api, ctx })
    }

    /// One transaction in the long-lived context.
    pub fn apply(&self, script: &str) -> Result<(), NftError> {
        self.api.run(self.ctx, script)
    }
}

impl Drop for Libnftables {
    fn drop(&mut self) {
        // SAFETY: the long-lived context is freed once, before the library unloads
        // (fields drop after this).
        unsafe { (self.api.ctx_free)(self.ctx) };
    }
}

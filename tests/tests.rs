//! Integration tests: all compile into one binary, one module per area.

mod auth;
mod common;
mod compact;
mod crash;
#[cfg(feature = "gpu")]
mod device_check;
mod embedder;
mod fleet;
mod flight;
#[cfg(feature = "gpu")]
mod gpu;
mod http;
mod layout;
mod memory;
mod produce;
mod reliability;

/// The same allocator as the binary, so memory figures and purges are the real ones.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = keel_engine::memory::allocator::MALLOC_CONF;

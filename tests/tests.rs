//! Integration tests: all compile into one binary, one module per area.

mod common;
mod flight;

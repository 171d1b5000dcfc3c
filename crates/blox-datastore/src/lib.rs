//! Roblox's DataStoreService for Blox: the Luau-facing objects, the strict value codec and the
//! storage backends.
//!
//! Layering: [`codec`] turns Luau values into stored JSON and back; [`backend`] stores entries
//! in SQLite or PostgreSQL behind one trait; [`operations`] builds Roblox's read-modify-write
//! semantics from the backend's primitives; [`service`] exposes it all to Luau with Roblox's
//! members, return values, yielding and errors.

pub mod backend;
pub mod cache;
pub mod codec;
mod error;
pub mod listing;

pub use error::DataStoreError;
pub mod operations;
pub mod service;

pub use service::{DataStoreContext, DataStoreService, create_instance};

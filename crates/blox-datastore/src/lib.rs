//! Roblox's DataStoreService for Blox: the Luau-facing objects, the strict value codec and the
//! storage backends.
//!
//! Layering: [`codec`] turns Luau values into stored JSON and back; [`backend`] stores entries
//! in SQLite or PostgreSQL behind one trait; [`operations`] builds Roblox's read-modify-write
//! semantics from the backend's primitives; [`service`] exposes it all to Luau with Roblox's
//! members, return values, yielding and errors.

/// Adds the fields every DataStore class has as an Instance: `typeof` gives "Instance",
/// `ClassName`, and `Name` (from `$name(this)`, or the class name when none is given).
macro_rules! instance_fields {
    ($fields:ident, $class:expr) => {
        $fields.add_meta_field(mlua::MetaMethod::Type, "Instance");
        $fields.add_field("ClassName", $class);
        $fields.add_field("Name", $class);
    };
    ($fields:ident, $class:expr, $name:expr) => {
        $fields.add_meta_field(mlua::MetaMethod::Type, "Instance");
        $fields.add_field("ClassName", $class);
        $fields.add_field_method_get("Name", |_, this| Ok($name(this)));
    };
}

/// Adds the members every DataStore class has as an Instance: `tostring`, `IsA`, and
/// Roblox's error for an unknown member.
macro_rules! instance_methods {
    ($methods:ident, $class:expr, $name:expr) => {
        $methods.add_meta_method(mlua::MetaMethod::ToString, |_, this, ()| Ok($name(this)));
        $methods.add_meta_method(mlua::MetaMethod::Index, |_, this, member: mlua::Value| {
            Err::<(), _>(mlua::Error::RuntimeError(format!(
                "{} is not a valid member of {} \"{}\"",
                member.to_string().unwrap_or_default(),
                $class,
                $name(this)
            )))
        });
        $methods.add_method("IsA", |_, _, class: String| {
            Ok(class == $class || class == "Instance")
        });
    };
}

mod attached;
pub mod backend;
pub mod budget;
pub mod cache;
pub mod codec;
mod error;
pub mod listing;

pub use error::DataStoreError;
pub mod operations;
pub mod ordered;
pub mod service;
pub mod updates;

pub use service::{DataStoreContext, DataStoreService, create_instance};

//! What Roblox's classes, properties and enums are, from Roblox's own API dump as the
//! rojo-rbx reflection database ships it.
//!
//! With it, any creatable class can be made with `Instance.new`, `IsA` follows the real class
//! hierarchy, every scriptable property reads (its default until written) and writes with its
//! declared type, and `Enum` holds every enum, so game code that sets `part.Anchored`,
//! `part.Position` or `part.Material = Enum.Material.Neon` runs unmodified. The properties
//! are data: nothing simulates physics or renders them.

use rbx_dom_weak::types::{Enum, Variant, VariantType};
use rbx_reflection::{
    ClassDescriptor, ClassTag, DataType, PropertyKind, ReflectionDatabase, Scriptability,
};

/// Roblox's reflection database, as bundled.
pub fn database() -> &'static ReflectionDatabase<'static> {
    rbx_reflection_database::get_bundled()
}

fn class(name: &str) -> Option<&'static ClassDescriptor<'static>> {
    database().classes.get(name)
}

/// True when the reflection database knows `class` as `ancestor` or a subclass of it.
pub fn is_a(class_name: &str, ancestor: &str) -> Option<bool> {
    let descriptor = class(class_name)?;
    Some(
        database()
            .superclasses_iter(descriptor)
            .any(|class| class.name == ancestor),
    )
}

/// True when scripts may create `class` with `Instance.new`.
pub fn creatable(class_name: &str) -> bool {
    class(class_name).is_some_and(|descriptor| {
        !descriptor.tags.contains(&ClassTag::NotCreatable)
            && !descriptor.tags.contains(&ClassTag::Service)
    })
}

/// A scriptable property of a class, as scripts see it.
#[derive(Debug, Clone, Copy)]
pub struct Property {
    /// The name the value is stored under (an alias resolved to its canonical property).
    pub stored_as: &'static str,
    /// The declared type.
    pub data_type: &'static DataType<'static>,
    /// Whether scripts may assign it.
    pub writable: bool,
    /// The class that declares it, for its default value.
    declared_by: &'static ClassDescriptor<'static>,
}

impl Property {
    /// The value a new instance has.
    pub fn default_value(&self) -> Option<&'static Variant> {
        database().find_default_property(self.declared_by, self.stored_as)
    }
}

/// The property `name` of `class`, if scripts can read it.
pub fn property(class_name: &str, name: &str) -> Option<Property> {
    let descriptor = class(class_name)?;
    for class in database().superclasses_iter(descriptor) {
        let Some(property) = class.properties.get(name) else {
            continue;
        };
        let writable = match property.scriptability {
            Scriptability::ReadWrite | Scriptability::Custom => true,
            Scriptability::Read => false,
            _ => return None,
        };
        let stored_as = match &property.kind {
            PropertyKind::Alias { alias_for } => alias_for,
            _ => property.name,
        };
        return Some(Property {
            stored_as,
            data_type: &property.data_type,
            writable,
            declared_by: descriptor,
        });
    }
    None
}

/// The value of `item` in enum `enum_name`, if Roblox has it.
pub fn enum_value(enum_name: &str, item: &str) -> Option<u32> {
    database().enums.get(enum_name)?.items.get(item).copied()
}

/// Every enum, as (enum name, [(item name, value)]).
pub fn enums() -> impl Iterator<Item = (&'static str, Vec<(&'static str, u32)>)> {
    database().enums.values().map(|descriptor| {
        let items = descriptor
            .items
            .iter()
            .map(|(name, value)| (*name, *value))
            .collect();
        (descriptor.name, items)
    })
}

/// The type name Roblox's assignment errors use for a declared type.
pub fn type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Enum(name) => format!("EnumItem of {name}"),
        DataType::Value(VariantType::Float32 | VariantType::Float64) => "number".to_owned(),
        DataType::Value(VariantType::Int32 | VariantType::Int64) => "int".to_owned(),
        DataType::Value(VariantType::Bool) => "bool".to_owned(),
        DataType::Value(VariantType::String | VariantType::ContentId) => "string".to_owned(),
        DataType::Value(VariantType::Ref) => "Instance".to_owned(),
        DataType::Value(other) => format!("{other:?}"),
        _ => "value".to_owned(),
    }
}

/// An enum value as stored.
pub fn enum_variant(value: u32) -> Variant {
    Variant::Enum(Enum::from_u32(value))
}

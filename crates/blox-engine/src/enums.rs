//! `Enum` and `EnumItem` as host userdata.
//!
//! Roblox libraries compare enum items by identity and check `typeof(x) == "EnumItem"`, which
//! Luau only reports for host userdata (`typeof` ignores `__type` on tables). Every item is
//! created once per VM so `==` holds between two reads of `Enum.SortDirection.Ascending`.

use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

/// The enums Blox defines, with their items' names and values.
const ENUMS: &[(&str, &[(&str, i64)])] = &[
    (
        "DataStoreRequestType",
        &[
            ("GetAsync", 0),
            ("SetIncrementAsync", 1),
            ("UpdateAsync", 2),
            ("GetSortedAsync", 3),
            ("SetIncrementSortedAsync", 4),
            ("OnUpdate", 5),
            ("ListAsync", 6),
            ("GetVersionAsync", 7),
            ("RemoveVersionAsync", 8),
            ("StandardRead", 9),
            ("StandardWrite", 10),
            ("StandardList", 11),
            ("StandardRemove", 12),
            ("OrderedRead", 13),
            ("OrderedWrite", 14),
            ("OrderedList", 15),
            ("OrderedRemove", 16),
        ],
    ),
    ("SortDirection", &[("Ascending", 0), ("Descending", 1)]),
    (
        "FontWeight",
        &[
            ("Thin", 100),
            ("ExtraLight", 200),
            ("Light", 300),
            ("Regular", 400),
            ("Medium", 500),
            ("SemiBold", 600),
            ("Bold", 700),
            ("ExtraBold", 800),
            ("Heavy", 900),
        ],
    ),
    ("FontStyle", &[("Normal", 0), ("Italic", 1)]),
];

/// One item of an enum.
#[derive(Debug, Clone)]
pub struct EnumItem {
    enum_name: &'static str,
    name: &'static str,
    value: i64,
}

impl UserData for EnumItem {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "EnumItem");
        fields.add_field_method_get("Name", |_, item| Ok(item.name));
        fields.add_field_method_get("Value", |_, item| Ok(item.value));
        fields.add_field_method_get("EnumType", |lua, item| {
            enum_table(lua)?.get::<Value>(item.enum_name)
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, item, ()| {
            Ok(format!("Enum.{}.{}", item.enum_name, item.name))
        });
        methods.add_method("IsA", |_, item, name: String| Ok(name == item.enum_name));
    }
}

/// One enum: indexing it by an item's name gives the item.
#[derive(Debug)]
pub struct EnumType {
    name: &'static str,
    items: Table,
}

impl UserData for EnumType {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Enum");
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("GetEnumItems", |lua, enum_type, ()| {
            let mut items = Vec::new();
            for pair in enum_type.items.pairs::<Value, AnyUserData>() {
                let (_, item) = pair?;
                items.push((item.borrow::<EnumItem>()?.value, item));
            }
            items.sort_by_key(|(value, _)| *value);
            lua.create_sequence_from(items.into_iter().map(|(_, item)| item))
        });
        methods.add_meta_method(
            MetaMethod::Index,
            |_, enum_type, name: String| match enum_type.items.raw_get::<Value>(name.as_str())? {
                Value::Nil => Err(mlua::Error::RuntimeError(format!(
                    "{name} is not a valid member of \"Enum.{}\"",
                    enum_type.name
                ))),
                item => Ok(item),
            },
        );
        methods.add_meta_method(MetaMethod::ToString, |_, enum_type, ()| Ok(enum_type.name));
    }
}

/// The `Enum` global: indexing it by an enum's name gives the enum.
#[derive(Debug)]
struct Enums(Table);

impl UserData for Enums {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Enums");
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |_, enums, name: String| {
            match enums.0.raw_get::<Value>(name.as_str())? {
                Value::Nil => Err(mlua::Error::RuntimeError(format!(
                    "{name} is not a valid member of \"Enum\""
                ))),
                found => Ok(found),
            }
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("Enum"));
    }
}

impl EnumItem {
    /// The enum's name and the item's value, for storing the item as an attribute.
    pub(crate) fn key(&self) -> (&'static str, i64) {
        (self.enum_name, self.value)
    }
}

/// The item of `enum_name` whose value is `value`, if Blox defines it.
pub(crate) fn item(lua: &Lua, enum_name: &str, value: i64) -> mlua::Result<Option<AnyUserData>> {
    let Some(enum_type) = enum_table(lua)?.raw_get::<Option<AnyUserData>>(enum_name)? else {
        return Ok(None);
    };
    let items = enum_type.borrow::<EnumType>()?.items.clone();
    for pair in items.pairs::<Value, AnyUserData>() {
        let (_, item) = pair?;
        if item.borrow::<EnumItem>()?.value == value {
            return Ok(Some(item));
        }
    }
    Ok(None)
}

const ENUM_TABLE_KEY: &str = "blox.enums";

fn enum_table(lua: &Lua) -> mlua::Result<Table> {
    lua.named_registry_value(ENUM_TABLE_KEY)
}

/// Installs the `Enum` global.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    // Every enum of Roblox's API, then Blox's own list on top: it holds values newer than the
    // bundled API dump (the modern DataStoreRequestType families).
    let mut all: Vec<(&'static str, Vec<(&'static str, i64)>)> = crate::reflection::enums()
        .map(|(name, items)| {
            let items = items
                .into_iter()
                .map(|(item, value)| (item, i64::from(value)))
                .collect();
            (name, items)
        })
        .collect();
    for (name, items) in ENUMS {
        all.retain(|(known, _)| known != name);
        all.push((name, items.to_vec()));
    }
    let enums = lua.create_table()?;
    for (enum_name, items) in all {
        let item_table = lua.create_table()?;
        for (name, value) in items {
            let item = EnumItem {
                enum_name,
                name,
                value,
            };
            item_table.raw_set(name, lua.create_userdata(item)?)?;
        }
        let enum_type = EnumType {
            name: enum_name,
            items: item_table,
        };
        enums.raw_set(enum_name, lua.create_userdata(enum_type)?)?;
    }
    lua.set_named_registry_value(ENUM_TABLE_KEY, &enums)?;
    lua.globals().set("Enum", Enums(enums))
}

//! `BrickColor`, `NumberSequence`, `ColorSequence` and `Font`: the datatypes whose values
//! come from Roblox's tables (the BrickColor palette, font weights and styles) or are lists
//! of keypoints. The palette is `rbx_types`'s, so names, numbers and colours match Roblox's.

use mlua::{
    FromLua, Lua, MetaMethod, MultiValue, Table, UserData, UserDataFields, UserDataMethods, Value,
};
use rbx_dom_weak::types::{self as rbx, Variant};

use crate::datatypes::{Color3, library};

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

/// The highest palette number Roblox uses.
const PALETTE_END: u16 = 1032;

/// `BrickColor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BrickColor(pub rbx::BrickColor);

impl BrickColor {
    fn number(self) -> u16 {
        self.0 as u16
    }

    fn rgb(self) -> [f64; 3] {
        let c = self.0.to_color3uint8();
        [c.r, c.g, c.b].map(|channel| f64::from(channel) / 255.0)
    }

    /// The palette colour nearest to an RGB colour, as `BrickColor.new(r, g, b)` picks it.
    fn nearest(rgb: [f64; 3]) -> Self {
        let distance = |color: &BrickColor| {
            let other = color.rgb();
            (0..3).map(|i| (other[i] - rgb[i]).powi(2)).sum::<f64>()
        };
        (1..=PALETTE_END)
            .filter_map(rbx::BrickColor::from_number)
            .map(BrickColor)
            .min_by(|a, b| distance(a).total_cmp(&distance(b)))
            .unwrap_or(BrickColor(rbx::BrickColor::MediumStoneGrey))
    }

    fn named(name: &str) -> Self {
        BrickColor(rbx::BrickColor::from_name(name).unwrap_or(rbx::BrickColor::MediumStoneGrey))
    }
}

impl FromLua for BrickColor {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match &value {
            Value::UserData(userdata) => userdata
                .borrow::<BrickColor>()
                .map(|b| *b)
                .map_err(|_| error("BrickColor expected")),
            other => Err(error(format!(
                "BrickColor expected, got {}",
                other.type_name()
            ))),
        }
    }
}

impl UserData for BrickColor {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "BrickColor");
        fields.add_field_method_get("Name", |_, b| Ok(b.0.to_string()));
        fields.add_field_method_get("Number", |_, b| Ok(b.number()));
        fields.add_field_method_get("Color", |_, b| Ok(Color3::from_array(b.rgb())));
        fields.add_field_method_get("r", |_, b| Ok(b.rgb()[0]));
        fields.add_field_method_get("g", |_, b| Ok(b.rgb()[1]));
        fields.add_field_method_get("b", |_, b| Ok(b.rgb()[2]));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: BrickColor| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, b, ()| Ok(b.0.to_string()));
    }
}

/// `NumberSequenceKeypoint`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumberKeypoint {
    time: f64,
    value: f64,
    envelope: f64,
}

impl UserData for NumberKeypoint {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "NumberSequenceKeypoint");
        fields.add_field_method_get("Time", |_, k| Ok(k.time));
        fields.add_field_method_get("Value", |_, k| Ok(k.value));
        fields.add_field_method_get("Envelope", |_, k| Ok(k.envelope));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(
            MetaMethod::Eq,
            |_, a, b: mlua::UserDataRef<NumberKeypoint>| Ok(*a == *b),
        );
    }
}

/// `ColorSequenceKeypoint`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorKeypoint {
    time: f64,
    value: Color3,
}

impl UserData for ColorKeypoint {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "ColorSequenceKeypoint");
        fields.add_field_method_get("Time", |_, k| Ok(k.time));
        fields.add_field_method_get("Value", |_, k| Ok(k.value));
    }
}

/// `NumberSequence`: keypoints from time 0 to time 1.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberSequence(Vec<NumberKeypoint>);

impl UserData for NumberSequence {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "NumberSequence");
        fields.add_field_method_get("Keypoints", |lua, s| {
            lua.create_sequence_from(s.0.iter().copied())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(
            MetaMethod::Eq,
            |_, a, b: mlua::UserDataRef<NumberSequence>| Ok(*a == *b),
        );
    }
}

/// `ColorSequence`: keypoints from time 0 to time 1.
#[derive(Debug, Clone, PartialEq)]
pub struct ColorSequence(Vec<ColorKeypoint>);

impl UserData for ColorSequence {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "ColorSequence");
        fields.add_field_method_get("Keypoints", |lua, s| {
            lua.create_sequence_from(s.0.iter().copied())
        });
    }
}

/// A number argument (integers included).
pub(crate) fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Integer(n) => Some(*n as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

/// Checks Roblox's rules for keypoints: at least two, times rising from 0 to 1.
fn check_times(times: &[f64], what: &str) -> mlua::Result<()> {
    let rising = times.windows(2).all(|pair| pair[0] <= pair[1]);
    if times.len() < 2 || times.first() != Some(&0.0) || times.last() != Some(&1.0) || !rising {
        return Err(error(format!(
            "{what}: keypoints must be in time order, starting at 0 and ending at 1"
        )));
    }
    Ok(())
}

/// `Font`: a family and Roblox's weight and style enums.
#[derive(Debug, Clone, PartialEq)]
pub struct Font(pub rbx::Font);

impl UserData for Font {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Font");
        fields.add_field_method_get("Family", |_, f| Ok(f.0.family.clone()));
        fields.add_field_method_get("Weight", |lua, f| {
            crate::enums::item(lua, "FontWeight", i64::from(f.0.weight.as_u16()))
        });
        fields.add_field_method_get("Style", |lua, f| {
            crate::enums::item(lua, "FontStyle", i64::from(f.0.style.as_u8()))
        });
        fields.add_field_method_get("Bold", |_, f| Ok(f.0.weight.as_u16() >= 600));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: mlua::UserDataRef<Font>| {
            Ok(*a == *b)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, f, ()| {
            Ok(format!("Font {{ Family = {} }}", f.0.family))
        });
    }
}

/// The value of an EnumItem argument of `enum_name`, or `default` when nil.
fn enum_argument(value: &Value, enum_name: &str, default: i64) -> mlua::Result<i64> {
    match value {
        Value::Nil => Ok(default),
        Value::UserData(item) => {
            let item = item
                .borrow::<crate::enums::EnumItem>()
                .map_err(|_| error(format!("{enum_name} expected")))?;
            let (name, value) = item.key();
            if name != enum_name {
                return Err(error(format!("{enum_name} expected, got Enum.{name}")));
            }
            Ok(value)
        }
        other => Err(error(format!(
            "{enum_name} expected, got {}",
            other.type_name()
        ))),
    }
}

fn font(family: String, weight: &Value, style: &Value) -> mlua::Result<Font> {
    let weight = rbx::FontWeight::from_u16(enum_argument(weight, "FontWeight", 400)? as u16)
        .ok_or_else(|| error("invalid FontWeight"))?;
    let style = rbx::FontStyle::from_u8(enum_argument(style, "FontStyle", 0)? as u8)
        .ok_or_else(|| error("invalid FontStyle"))?;
    Ok(Font(rbx::Font::new(&family, weight, style)))
}

/// Installs the globals of these datatypes.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    library(lua, "BrickColor", |t| {
        t.set(
            "new",
            lua.create_function(|lua, args: MultiValue| {
                let values: Vec<Value> = args.into_iter().collect();
                Ok(match values.as_slice() {
                    [Value::String(name)] => BrickColor::named(&name.to_str()?),
                    [Value::Integer(_) | Value::Number(_)] => {
                        let number = f64::from_lua(values[0].clone(), lua)? as u16;
                        BrickColor(
                            rbx::BrickColor::from_number(number)
                                .unwrap_or(rbx::BrickColor::MediumStoneGrey),
                        )
                    }
                    [Value::UserData(color)] => {
                        BrickColor::nearest(color.borrow::<Color3>()?.to_array())
                    }
                    [r, g, b] => BrickColor::nearest([
                        f64::from_lua(r.clone(), lua)?,
                        f64::from_lua(g.clone(), lua)?,
                        f64::from_lua(b.clone(), lua)?,
                    ]),
                    _ => BrickColor::named("Medium stone grey"),
                })
            })?,
        )?;
        t.set(
            "palette",
            lua.create_function(|_, index: u16| {
                (1..=PALETTE_END)
                    .filter_map(rbx::BrickColor::from_number)
                    .nth(usize::from(index))
                    .map(BrickColor)
                    .ok_or_else(|| error("BrickColor.palette: index out of range"))
            })?,
        )?;
        t.set(
            "random",
            lua.create_function(|lua, ()| {
                let colors: Vec<rbx::BrickColor> = (1..=PALETTE_END)
                    .filter_map(rbx::BrickColor::from_number)
                    .collect();
                let random: mlua::Function = lua.globals().get::<Table>("math")?.get("random")?;
                let index: usize = random.call(colors.len())?;
                Ok(BrickColor(colors[index.saturating_sub(1)]))
            })?,
        )?;
        for (function, name) in [
            ("White", "White"),
            ("Gray", "Medium stone grey"),
            ("DarkGray", "Dark stone grey"),
            ("Black", "Black"),
            ("Red", "Bright red"),
            ("Yellow", "Bright yellow"),
            ("Green", "Dark green"),
            ("Blue", "Bright blue"),
        ] {
            t.set(
                function,
                lua.create_function(move |_, ()| Ok(BrickColor::named(name)))?,
            )?;
        }
        Ok(())
    })?;
    library(lua, "NumberSequenceKeypoint", |t| {
        t.set(
            "new",
            lua.create_function(|_, (time, value, envelope): (f64, f64, Option<f64>)| {
                Ok(NumberKeypoint {
                    time,
                    value,
                    envelope: envelope.unwrap_or(0.0),
                })
            })?,
        )
    })?;
    library(lua, "ColorSequenceKeypoint", |t| {
        t.set(
            "new",
            lua.create_function(|_, (time, color): (f64, Value)| {
                let Value::UserData(color) = color else {
                    return Err(error("ColorSequenceKeypoint.new: Color3 expected"));
                };
                Ok(ColorKeypoint {
                    time,
                    value: *color.borrow::<Color3>()?,
                })
            })?,
        )
    })?;
    library(lua, "NumberSequence", |t| {
        t.set(
            "new",
            lua.create_function(|_, args: MultiValue| {
                let values: Vec<Value> = args.into_iter().collect();
                let keypoints = match values.as_slice() {
                    [Value::Table(list)] => list
                        .sequence_values::<mlua::AnyUserData>()
                        .map(|k| Ok(*k?.borrow::<NumberKeypoint>()?))
                        .collect::<mlua::Result<Vec<_>>>()?,
                    [a] => {
                        let n = a
                            .as_f64()
                            .ok_or_else(|| error("NumberSequence.new: number expected"))?;
                        vec![
                            NumberKeypoint {
                                time: 0.0,
                                value: n,
                                envelope: 0.0,
                            },
                            NumberKeypoint {
                                time: 1.0,
                                value: n,
                                envelope: 0.0,
                            },
                        ]
                    }
                    [a, b] => {
                        let (a, b) = (as_number(a), as_number(b));
                        let (Some(a), Some(b)) = (a, b) else {
                            return Err(error("NumberSequence.new: number expected"));
                        };
                        vec![
                            NumberKeypoint {
                                time: 0.0,
                                value: a,
                                envelope: 0.0,
                            },
                            NumberKeypoint {
                                time: 1.0,
                                value: b,
                                envelope: 0.0,
                            },
                        ]
                    }
                    _ => return Err(error("NumberSequence.new: invalid arguments")),
                };
                check_times(
                    &keypoints.iter().map(|k| k.time).collect::<Vec<_>>(),
                    "NumberSequence.new",
                )?;
                Ok(NumberSequence(keypoints))
            })?,
        )
    })?;
    library(lua, "ColorSequence", |t| {
        t.set(
            "new",
            lua.create_function(|_, args: MultiValue| {
                let values: Vec<Value> = args.into_iter().collect();
                let color = |value: &Value| -> mlua::Result<Color3> {
                    match value {
                        Value::UserData(color) => Ok(*color.borrow::<Color3>()?),
                        _ => Err(error("ColorSequence.new: Color3 expected")),
                    }
                };
                let keypoints = match values.as_slice() {
                    [Value::Table(list)] => list
                        .sequence_values::<mlua::AnyUserData>()
                        .map(|k| Ok(*k?.borrow::<ColorKeypoint>()?))
                        .collect::<mlua::Result<Vec<_>>>()?,
                    [a] => vec![
                        ColorKeypoint {
                            time: 0.0,
                            value: color(a)?,
                        },
                        ColorKeypoint {
                            time: 1.0,
                            value: color(a)?,
                        },
                    ],
                    [a, b] => vec![
                        ColorKeypoint {
                            time: 0.0,
                            value: color(a)?,
                        },
                        ColorKeypoint {
                            time: 1.0,
                            value: color(b)?,
                        },
                    ],
                    _ => return Err(error("ColorSequence.new: invalid arguments")),
                };
                check_times(
                    &keypoints.iter().map(|k| k.time).collect::<Vec<_>>(),
                    "ColorSequence.new",
                )?;
                Ok(ColorSequence(keypoints))
            })?,
        )
    })?;
    library(lua, "Font", |t| {
        t.set(
            "new",
            lua.create_function(|_, (family, weight, style): (String, Value, Value)| {
                font(family, &weight, &style)
            })?,
        )?;
        t.set(
            "fromName",
            lua.create_function(|_, (name, weight, style): (String, Value, Value)| {
                font(
                    format!("rbxasset://fonts/families/{name}.json"),
                    &weight,
                    &style,
                )
            })?,
        )
    })?;
    Ok(())
}

/// These datatypes as `rbx_types` values; `None` for other values.
pub fn to_variant(value: &mlua::AnyUserData) -> Option<Variant> {
    let f = |n: f64| n as f32;
    if let Ok(brick) = value.borrow::<BrickColor>() {
        return Some(Variant::BrickColor(brick.0));
    }
    if let Ok(sequence) = value.borrow::<NumberSequence>() {
        let keypoints = sequence
            .0
            .iter()
            .map(|k| rbx::NumberSequenceKeypoint::new(f(k.time), f(k.value), f(k.envelope)))
            .collect();
        return Some(Variant::NumberSequence(rbx::NumberSequence { keypoints }));
    }
    if let Ok(sequence) = value.borrow::<ColorSequence>() {
        let keypoints = sequence
            .0
            .iter()
            .map(|k| {
                let [r, g, b] = k.value.to_array();
                rbx::ColorSequenceKeypoint::new(f(k.time), rbx::Color3::new(f(r), f(g), f(b)))
            })
            .collect();
        return Some(Variant::ColorSequence(rbx::ColorSequence { keypoints }));
    }
    if let Ok(font) = value.borrow::<Font>() {
        return Some(Variant::Font(font.0.clone()));
    }
    None
}

/// These datatypes from `rbx_types` values; `None` for other values.
pub fn from_variant(lua: &Lua, value: &Variant) -> mlua::Result<Option<Value>> {
    let d = f64::from;
    let userdata = match value {
        Variant::BrickColor(brick) => lua.create_userdata(BrickColor(*brick))?,
        Variant::NumberSequence(sequence) => lua.create_userdata(NumberSequence(
            sequence
                .keypoints
                .iter()
                .map(|k| NumberKeypoint {
                    time: d(k.time),
                    value: d(k.value),
                    envelope: d(k.envelope),
                })
                .collect(),
        ))?,
        Variant::ColorSequence(sequence) => lua.create_userdata(ColorSequence(
            sequence
                .keypoints
                .iter()
                .map(|k| ColorKeypoint {
                    time: d(k.time),
                    value: Color3::from_array([d(k.color.r), d(k.color.g), d(k.color.b)]),
                })
                .collect(),
        ))?,
        Variant::Font(font) => lua.create_userdata(Font(font.clone()))?,
        _ => return Ok(None),
    };
    Ok(Some(Value::UserData(userdata)))
}

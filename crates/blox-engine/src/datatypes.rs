//! Roblox's value datatypes that server code builds and stores: `Vector3`, `Vector2`,
//! `Color3`, `UDim`, `UDim2`, `NumberRange` and `Rect`, as host userdata (`typeof` gives the
//! type's name), immutable like Roblox's, with their constructors, members and operators.
//!
//! They convert to and from `rbx_types` values ([`to_variant`], [`from_variant`]), as do
//! `EnumItem`s, so they can be attributes and property values in the instance tree, and place
//! files hand them back as the same types.

use mlua::{FromLua, Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};
use rbx_dom_weak::types::{self as rbx, Variant};

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

/// A number argument (nil counts as 0, as Roblox's constructors take it).
fn number(value: &Value, what: &str) -> mlua::Result<f64> {
    match value {
        Value::Integer(n) => Ok(*n as f64),
        Value::Number(n) => Ok(*n),
        Value::Nil => Ok(0.0),
        other => Err(error(format!(
            "invalid argument to {what} (number expected, got {})",
            other.type_name()
        ))),
    }
}

/// A component as Luau prints a number.
fn component(n: f64) -> String {
    Value::Number(n).to_string().unwrap_or_default()
}

/// Reads a datatype back from a Luau value, with Roblox's "X expected" error.
macro_rules! from_lua {
    ($type:ident) => {
        impl FromLua for $type {
            fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
                match &value {
                    Value::UserData(userdata) => userdata
                        .borrow::<$type>()
                        .map(|v| *v)
                        .map_err(|_| error(concat!(stringify!($type), " expected"))),
                    other => Err(error(format!(
                        concat!(stringify!($type), " expected, got {}"),
                        other.type_name()
                    ))),
                }
            }
        }
    };
}

/// A vector type (`Vector3`, `Vector2`): components, `Magnitude`, `Unit`, `Dot`, `Lerp`,
/// `FuzzyEq`, and arithmetic with vectors or numbers.
macro_rules! vector {
    ($type:ident, [$($axis:ident => $field:literal),+] $(, extra |$methods:ident| $extra:block)?) => {
        #[doc = concat!("`", stringify!($type), "`.")]
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct $type { $($axis: f64),+ }
        from_lua!($type);

        impl $type {
            fn map(self, other: Self, op: impl Fn(f64, f64) -> f64) -> Self {
                Self { $($axis: op(self.$axis, other.$axis)),+ }
            }

            fn splat(n: f64) -> Self {
                Self { $($axis: n),+ }
            }

            fn dot(self, other: Self) -> f64 {
                0.0 $(+ self.$axis * other.$axis)+
            }

            fn magnitude(self) -> f64 {
                self.dot(self).sqrt()
            }

            /// The right operand of arithmetic: a vector, or a number for every axis.
            fn operand(lua: &Lua, value: Value) -> mlua::Result<Self> {
                match value {
                    Value::Integer(_) | Value::Number(_) => {
                        Ok(Self::splat(number(&value, stringify!($type))?))
                    }
                    other => Self::from_lua(other, lua),
                }
            }
        }

        impl UserData for $type {
            fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
                fields.add_meta_field(MetaMethod::Type, stringify!($type));
                $(fields.add_field_method_get($field, |_, v| Ok(v.$axis));)+
                fields.add_field_method_get("Magnitude", |_, v| Ok(v.magnitude()));
                fields.add_field_method_get("Unit", |_, v| {
                    let magnitude = v.magnitude();
                    Ok(if magnitude == 0.0 { *v } else { v.map(Self::splat(magnitude), |a, b| a / b) })
                });
            }

            fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
                methods.add_method("Dot", |_, a, b: $type| Ok(a.dot(b)));
                methods.add_method("Lerp", |_, a, (b, t): ($type, f64)| {
                    Ok(a.map(b, |a, b| a + (b - a) * t))
                });
                methods.add_method("FuzzyEq", |_, a, (b, epsilon): ($type, Option<f64>)| {
                    Ok(a.map(b, |a, b| a - b).magnitude() <= epsilon.unwrap_or(1e-5))
                });
                methods.add_meta_method(MetaMethod::Add, |lua, a, b: Value| {
                    Ok(a.map($type::operand(lua, b)?, |a, b| a + b))
                });
                methods.add_meta_method(MetaMethod::Sub, |lua, a, b: Value| {
                    Ok(a.map($type::operand(lua, b)?, |a, b| a - b))
                });
                methods.add_meta_method(MetaMethod::Mul, |lua, a, b: Value| {
                    Ok(a.map($type::operand(lua, b)?, |a, b| a * b))
                });
                methods.add_meta_method(MetaMethod::Div, |lua, a, b: Value| {
                    Ok(a.map($type::operand(lua, b)?, |a, b| a / b))
                });
                methods.add_meta_method(MetaMethod::Unm, |_, a, ()| {
                    Ok(a.map(Self::splat(-1.0), |a, b| a * b))
                });
                methods.add_meta_method(MetaMethod::Eq, |_, a, b: $type| Ok(*a == b));
                methods.add_meta_method(MetaMethod::ToString, |_, v, ()| {
                    Ok([$(component(v.$axis)),+].join(", "))
                });
                $(
                    let $methods = methods;
                    $extra
                )?
            }
        }
    };
}

vector!(Vector3, [x => "X", y => "Y", z => "Z"], extra |methods| {
    methods.add_method("Cross", |_, a, b: Vector3| Ok(a.cross(b)));
});
vector!(Vector2, [x => "X", y => "Y"]);

impl Vector3 {
    /// A Vector3 of `[x, y, z]`.
    pub(crate) fn from_array([x, y, z]: [f64; 3]) -> Self {
        Self { x, y, z }
    }

    /// `[x, y, z]`.
    pub(crate) fn to_array(self) -> [f64; 3] {
        [self.x, self.y, self.z]
    }

    fn cross(self, b: Self) -> Self {
        Self {
            x: self.y * b.z - self.z * b.y,
            y: self.z * b.x - self.x * b.z,
            z: self.x * b.y - self.y * b.x,
        }
    }
}

/// `Color3`: components from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Color3 {
    r: f64,
    g: f64,
    b: f64,
}
from_lua!(Color3);

impl Color3 {
    /// A Color3 of `[r, g, b]`.
    pub(crate) fn from_array([r, g, b]: [f64; 3]) -> Self {
        Self { r, g, b }
    }

    /// `[r, g, b]`.
    pub(crate) fn to_array(self) -> [f64; 3] {
        [self.r, self.g, self.b]
    }

    fn hex(self) -> String {
        let byte = |c: f64| (c.clamp(0.0, 1.0) * 255.0).round() as u8;
        format!(
            "{:02X}{:02X}{:02X}",
            byte(self.r),
            byte(self.g),
            byte(self.b)
        )
    }

    fn from_hsv(h: f64, s: f64, v: f64) -> Self {
        let i = (h * 6.0).floor();
        let f = h * 6.0 - i;
        let (p, q, t) = (v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s));
        let (r, g, b) = match (i as i64).rem_euclid(6) {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        Self { r, g, b }
    }
}

impl UserData for Color3 {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Color3");
        fields.add_field_method_get("R", |_, c| Ok(c.r));
        fields.add_field_method_get("G", |_, c| Ok(c.g));
        fields.add_field_method_get("B", |_, c| Ok(c.b));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("Lerp", |_, a, (b, t): (Color3, f64)| {
            let mix = |a: f64, b: f64| a + (b - a) * t;
            Ok(Color3 {
                r: mix(a.r, b.r),
                g: mix(a.g, b.g),
                b: mix(a.b, b.b),
            })
        });
        methods.add_method("ToHex", |_, c, ()| Ok(c.hex()));
        methods.add_method("ToHSV", |_, c, ()| {
            let max = c.r.max(c.g).max(c.b);
            let min = c.r.min(c.g).min(c.b);
            let delta = max - min;
            let hue = if delta == 0.0 {
                0.0
            } else if max == c.r {
                ((c.g - c.b) / delta).rem_euclid(6.0) / 6.0
            } else if max == c.g {
                ((c.b - c.r) / delta + 2.0) / 6.0
            } else {
                ((c.r - c.g) / delta + 4.0) / 6.0
            };
            let saturation = if max == 0.0 { 0.0 } else { delta / max };
            Ok((hue, saturation, max))
        });
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: Color3| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, c, ()| {
            Ok(format!(
                "{}, {}, {}",
                component(c.r),
                component(c.g),
                component(c.b)
            ))
        });
    }
}

/// `UDim`: a scale and an offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UDim {
    scale: f64,
    offset: f64,
}
from_lua!(UDim);

impl UserData for UDim {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "UDim");
        fields.add_field_method_get("Scale", |_, u| Ok(u.scale));
        fields.add_field_method_get("Offset", |_, u| Ok(u.offset));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Add, |_, a, b: UDim| {
            Ok(UDim {
                scale: a.scale + b.scale,
                offset: a.offset + b.offset,
            })
        });
        methods.add_meta_method(MetaMethod::Sub, |_, a, b: UDim| {
            Ok(UDim {
                scale: a.scale - b.scale,
                offset: a.offset - b.offset,
            })
        });
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: UDim| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, u, ()| {
            Ok(format!("{}, {}", component(u.scale), component(u.offset)))
        });
    }
}

/// `UDim2`: a `UDim` on each axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UDim2 {
    x: UDim,
    y: UDim,
}
from_lua!(UDim2);

impl UserData for UDim2 {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "UDim2");
        fields.add_field_method_get("X", |_, u| Ok(u.x));
        fields.add_field_method_get("Y", |_, u| Ok(u.y));
        fields.add_field_method_get("Width", |_, u| Ok(u.x));
        fields.add_field_method_get("Height", |_, u| Ok(u.y));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("Lerp", |_, a, (b, t): (UDim2, f64)| {
            let mix = |a: UDim, b: UDim| UDim {
                scale: a.scale + (b.scale - a.scale) * t,
                offset: a.offset + (b.offset - a.offset) * t,
            };
            Ok(UDim2 {
                x: mix(a.x, b.x),
                y: mix(a.y, b.y),
            })
        });
        methods.add_meta_method(MetaMethod::Add, |_, a, b: UDim2| {
            let add = |a: UDim, b: UDim| UDim {
                scale: a.scale + b.scale,
                offset: a.offset + b.offset,
            };
            Ok(UDim2 {
                x: add(a.x, b.x),
                y: add(a.y, b.y),
            })
        });
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: UDim2| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, u, ()| {
            Ok(format!(
                "{{{}, {}}}, {{{}, {}}}",
                component(u.x.scale),
                component(u.x.offset),
                component(u.y.scale),
                component(u.y.offset)
            ))
        });
    }
}

/// `NumberRange`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumberRange {
    min: f64,
    max: f64,
}
from_lua!(NumberRange);

impl UserData for NumberRange {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "NumberRange");
        fields.add_field_method_get("Min", |_, r| Ok(r.min));
        fields.add_field_method_get("Max", |_, r| Ok(r.max));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: NumberRange| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, r, ()| {
            Ok(format!("{} {} ", component(r.min), component(r.max)))
        });
    }
}

/// `Rect`: two corners.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    min: Vector2,
    max: Vector2,
}
from_lua!(Rect);

impl UserData for Rect {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Rect");
        fields.add_field_method_get("Min", |_, r| Ok(r.min));
        fields.add_field_method_get("Max", |_, r| Ok(r.max));
        fields.add_field_method_get("Width", |_, r| Ok(r.max.x - r.min.x));
        fields.add_field_method_get("Height", |_, r| Ok(r.max.y - r.min.y));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: Rect| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, r, ()| {
            Ok(format!(
                "{}, {}, {}, {}",
                component(r.min.x),
                component(r.min.y),
                component(r.max.x),
                component(r.max.y)
            ))
        });
    }
}

/// A read-only table of constructors and constants, installed as a global.
pub(crate) fn library(
    lua: &Lua,
    name: &str,
    build: impl FnOnce(&Table) -> mlua::Result<()>,
) -> mlua::Result<()> {
    let table = lua.create_table()?;
    build(&table)?;
    table.set_readonly(true);
    lua.globals().set(name, table)
}

/// Installs the datatype globals.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    library(lua, "Vector3", |t| {
        t.set(
            "new",
            lua.create_function(|_, (x, y, z): (Value, Value, Value)| {
                Ok(Vector3 {
                    x: number(&x, "Vector3.new")?,
                    y: number(&y, "Vector3.new")?,
                    z: number(&z, "Vector3.new")?,
                })
            })?,
        )?;
        t.set("zero", Vector3::splat(0.0))?;
        t.set("one", Vector3::splat(1.0))?;
        t.set(
            "xAxis",
            Vector3 {
                x: 1.0,
                y: 0.0,
                z: 0.0,
            },
        )?;
        t.set(
            "yAxis",
            Vector3 {
                x: 0.0,
                y: 1.0,
                z: 0.0,
            },
        )?;
        t.set(
            "zAxis",
            Vector3 {
                x: 0.0,
                y: 0.0,
                z: 1.0,
            },
        )?;
        t.set(
            "cross",
            lua.create_function(|_, (a, b): (Vector3, Vector3)| Ok(a.cross(b)))?,
        )
    })?;
    library(lua, "Vector2", |t| {
        t.set(
            "new",
            lua.create_function(|_, (x, y): (Value, Value)| {
                Ok(Vector2 {
                    x: number(&x, "Vector2.new")?,
                    y: number(&y, "Vector2.new")?,
                })
            })?,
        )?;
        t.set("zero", Vector2::splat(0.0))?;
        t.set("one", Vector2::splat(1.0))?;
        t.set("xAxis", Vector2 { x: 1.0, y: 0.0 })?;
        t.set("yAxis", Vector2 { x: 0.0, y: 1.0 })
    })?;
    library(lua, "Color3", |t| {
        t.set(
            "new",
            lua.create_function(|_, (r, g, b): (Value, Value, Value)| {
                Ok(Color3 {
                    r: number(&r, "Color3.new")?,
                    g: number(&g, "Color3.new")?,
                    b: number(&b, "Color3.new")?,
                })
            })?,
        )?;
        t.set(
            "fromRGB",
            lua.create_function(|_, (r, g, b): (Value, Value, Value)| {
                let channel = |v: &Value| number(v, "Color3.fromRGB").map(|n| n / 255.0);
                Ok(Color3 {
                    r: channel(&r)?,
                    g: channel(&g)?,
                    b: channel(&b)?,
                })
            })?,
        )?;
        t.set(
            "fromHSV",
            lua.create_function(|_, (h, s, v): (f64, f64, f64)| Ok(Color3::from_hsv(h, s, v)))?,
        )?;
        t.set(
            "fromHex",
            lua.create_function(|_, hex: String| {
                let digits = hex.trim_start_matches('#');
                let parsed = (digits.len() == 6)
                    .then(|| u32::from_str_radix(digits, 16).ok())
                    .flatten()
                    .ok_or_else(|| {
                        error(format!("Unable to convert characters to hex value: {hex}"))
                    })?;
                let channel = |shift: u32| f64::from((parsed >> shift) & 0xFF) / 255.0;
                Ok(Color3 {
                    r: channel(16),
                    g: channel(8),
                    b: channel(0),
                })
            })?,
        )
    })?;
    library(lua, "UDim", |t| {
        t.set(
            "new",
            lua.create_function(|_, (scale, offset): (Value, Value)| {
                Ok(UDim {
                    scale: number(&scale, "UDim.new")?,
                    offset: number(&offset, "UDim.new")?,
                })
            })?,
        )
    })?;
    library(lua, "UDim2", |t| {
        t.set(
            "new",
            lua.create_function(|_, (xs, xo, ys, yo): (Value, Value, Value, Value)| {
                let n = |v: &Value| number(v, "UDim2.new");
                Ok(UDim2 {
                    x: UDim {
                        scale: n(&xs)?,
                        offset: n(&xo)?,
                    },
                    y: UDim {
                        scale: n(&ys)?,
                        offset: n(&yo)?,
                    },
                })
            })?,
        )?;
        t.set(
            "fromScale",
            lua.create_function(|_, (x, y): (f64, f64)| {
                Ok(UDim2 {
                    x: UDim {
                        scale: x,
                        offset: 0.0,
                    },
                    y: UDim {
                        scale: y,
                        offset: 0.0,
                    },
                })
            })?,
        )?;
        t.set(
            "fromOffset",
            lua.create_function(|_, (x, y): (f64, f64)| {
                Ok(UDim2 {
                    x: UDim {
                        scale: 0.0,
                        offset: x,
                    },
                    y: UDim {
                        scale: 0.0,
                        offset: y,
                    },
                })
            })?,
        )
    })?;
    library(lua, "NumberRange", |t| {
        t.set(
            "new",
            lua.create_function(|_, (min, max): (f64, Option<f64>)| {
                let max = max.unwrap_or(min);
                if max < min {
                    return Err(error("NumberRange: invalid range"));
                }
                Ok(NumberRange { min, max })
            })?,
        )
    })?;
    library(lua, "Rect", |t| {
        t.set(
            "new",
            lua.create_function(|lua, args: mlua::MultiValue| {
                let values: Vec<Value> = args.into_iter().collect();
                if let [Value::UserData(_), Value::UserData(_)] = values.as_slice() {
                    let min = Vector2::from_lua(values[0].clone(), lua)?;
                    let max = Vector2::from_lua(values[1].clone(), lua)?;
                    return Ok(Rect { min, max });
                }
                let n = |i: usize| number(values.get(i).unwrap_or(&Value::Nil), "Rect.new");
                Ok(Rect {
                    min: Vector2 { x: n(0)?, y: n(1)? },
                    max: Vector2 { x: n(2)?, y: n(3)? },
                })
            })?,
        )
    })?;
    Ok(())
}

/// A datatype value as an `rbx_types` value, for attributes and properties; `None` when the
/// value is not one of these datatypes.
pub fn to_variant(value: &Value) -> Option<Variant> {
    let Value::UserData(userdata) = value else {
        return None;
    };
    if let Some(variant) = crate::palette::to_variant(userdata) {
        return Some(variant);
    }
    let f = |n: f64| n as f32;
    if let Ok(v) = userdata.borrow::<Vector3>() {
        return Some(Variant::Vector3(rbx::Vector3::new(f(v.x), f(v.y), f(v.z))));
    }
    if let Ok(v) = userdata.borrow::<Vector2>() {
        return Some(Variant::Vector2(rbx::Vector2::new(f(v.x), f(v.y))));
    }
    if let Ok(c) = userdata.borrow::<Color3>() {
        return Some(Variant::Color3(rbx::Color3::new(f(c.r), f(c.g), f(c.b))));
    }
    if let Ok(u) = userdata.borrow::<UDim>() {
        return Some(Variant::UDim(rbx::UDim::new(f(u.scale), u.offset as i32)));
    }
    if let Ok(u) = userdata.borrow::<UDim2>() {
        return Some(Variant::UDim2(rbx::UDim2::new(
            rbx::UDim::new(f(u.x.scale), u.x.offset as i32),
            rbx::UDim::new(f(u.y.scale), u.y.offset as i32),
        )));
    }
    if let Ok(r) = userdata.borrow::<NumberRange>() {
        return Some(Variant::NumberRange(rbx::NumberRange::new(
            f(r.min),
            f(r.max),
        )));
    }
    if let Ok(cframe) = userdata.borrow::<crate::cframe::CFrame>() {
        return Some(Variant::CFrame(cframe.to_rbx()));
    }
    if let Ok(item) = userdata.borrow::<crate::enums::EnumItem>() {
        let (ty, value) = item.key();
        return Some(Variant::EnumItem(rbx::EnumItem {
            ty: ty.to_owned(),
            value: value as u32,
        }));
    }
    if let Ok(r) = userdata.borrow::<Rect>() {
        return Some(Variant::Rect(rbx::Rect::new(
            rbx::Vector2::new(f(r.min.x), f(r.min.y)),
            rbx::Vector2::new(f(r.max.x), f(r.max.y)),
        )));
    }
    None
}

/// An `rbx_types` value as a datatype; `None` for values of other types.
pub fn from_variant(lua: &Lua, value: &Variant) -> mlua::Result<Option<Value>> {
    let d = f64::from;
    let udim = |u: rbx::UDim| UDim {
        scale: d(u.scale),
        offset: f64::from(u.offset),
    };
    let userdata = match value {
        Variant::Vector3(v) => lua.create_userdata(Vector3 {
            x: d(v.x),
            y: d(v.y),
            z: d(v.z),
        })?,
        Variant::Vector2(v) => lua.create_userdata(Vector2 {
            x: d(v.x),
            y: d(v.y),
        })?,
        Variant::Color3(c) => lua.create_userdata(Color3 {
            r: d(c.r),
            g: d(c.g),
            b: d(c.b),
        })?,
        Variant::UDim(u) => lua.create_userdata(udim(*u))?,
        Variant::UDim2(u) => lua.create_userdata(UDim2 {
            x: udim(u.x),
            y: udim(u.y),
        })?,
        Variant::NumberRange(r) => lua.create_userdata(NumberRange {
            min: d(r.min),
            max: d(r.max),
        })?,
        Variant::Rect(r) => lua.create_userdata(Rect {
            min: Vector2 {
                x: d(r.min.x),
                y: d(r.min.y),
            },
            max: Vector2 {
                x: d(r.max.x),
                y: d(r.max.y),
            },
        })?,
        Variant::CFrame(cframe) => lua.create_userdata(crate::cframe::CFrame::from_rbx(cframe))?,
        Variant::EnumItem(item) => {
            return Ok(
                crate::enums::item(lua, &item.ty, i64::from(item.value))?.map(Value::UserData)
            );
        }
        other => return crate::palette::from_variant(lua, other),
    };
    Ok(Some(Value::UserData(userdata)))
}

//! `CFrame`: a position and a rotation, as Roblox composes and prints them.
//!
//! Stored as the position and the rotation matrix's rows (`R00..R22`), Roblox's component
//! order, so `GetComponents` and `tostring` give the twelve numbers scripts expect.
//! `RightVector`, `UpVector` and `LookVector` are the matrix's columns (the look vector
//! negated), `Angles` composes X, then Y, then Z rotations, and `Lerp` interpolates the
//! rotation along the shortest arc (quaternion slerp).

use mlua::{
    FromLua, Lua, MetaMethod, MultiValue, Table, UserData, UserDataFields, UserDataMethods, Value,
};
use rbx_dom_weak::types as rbx;

use crate::datatypes::Vector3;

type Rows = [[f64; 3]; 3];

const IDENTITY: Rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

/// `CFrame`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CFrame {
    position: [f64; 3],
    rows: Rows,
}

fn error(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

fn multiply(a: &Rows, b: &Rows) -> Rows {
    let mut out = [[0.0; 3]; 3];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            *cell = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

fn apply(rows: &Rows, v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| rows[i][0] * v[0] + rows[i][1] * v[1] + rows[i][2] * v[2])
}

fn transpose(rows: &Rows) -> Rows {
    [0, 1, 2].map(|i| [rows[0][i], rows[1][i], rows[2][i]])
}

fn rotation_x(a: f64) -> Rows {
    let (s, c) = a.sin_cos();
    [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
}

fn rotation_y(a: f64) -> Rows {
    let (s, c) = a.sin_cos();
    [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]
}

fn rotation_z(a: f64) -> Rows {
    let (s, c) = a.sin_cos();
    [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn unit(v: [f64; 3]) -> [f64; 3] {
    let length = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    if length == 0.0 {
        v
    } else {
        v.map(|c| c / length)
    }
}

/// A rotation matrix as a unit quaternion (w, x, y, z).
fn quaternion(r: &Rows) -> [f64; 4] {
    let trace = r[0][0] + r[1][1] + r[2][2];
    let q = if trace > 0.0 {
        let s = (trace + 1.0).sqrt() * 2.0;
        [
            s / 4.0,
            (r[2][1] - r[1][2]) / s,
            (r[0][2] - r[2][0]) / s,
            (r[1][0] - r[0][1]) / s,
        ]
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt() * 2.0;
        [
            (r[2][1] - r[1][2]) / s,
            s / 4.0,
            (r[0][1] + r[1][0]) / s,
            (r[0][2] + r[2][0]) / s,
        ]
    } else if r[1][1] > r[2][2] {
        let s = (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt() * 2.0;
        [
            (r[0][2] - r[2][0]) / s,
            (r[0][1] + r[1][0]) / s,
            s / 4.0,
            (r[1][2] + r[2][1]) / s,
        ]
    } else {
        let s = (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt() * 2.0;
        [
            (r[1][0] - r[0][1]) / s,
            (r[0][2] + r[2][0]) / s,
            (r[1][2] + r[2][1]) / s,
            s / 4.0,
        ]
    };
    let length = q.iter().map(|c| c * c).sum::<f64>().sqrt();
    q.map(|c| c / length)
}

fn from_quaternion([w, x, y, z]: [f64; 4]) -> Rows {
    [
        [
            1.0 - 2.0 * (y * y + z * z),
            2.0 * (x * y - w * z),
            2.0 * (x * z + w * y),
        ],
        [
            2.0 * (x * y + w * z),
            1.0 - 2.0 * (x * x + z * z),
            2.0 * (y * z - w * x),
        ],
        [
            2.0 * (x * z - w * y),
            2.0 * (y * z + w * x),
            1.0 - 2.0 * (x * x + y * y),
        ],
    ]
}

fn slerp(a: [f64; 4], mut b: [f64; 4], t: f64) -> [f64; 4] {
    let mut dot: f64 = (0..4).map(|i| a[i] * b[i]).sum();
    if dot < 0.0 {
        b = b.map(|c| -c);
        dot = -dot;
    }
    if dot > 0.9995 {
        let mixed = [0, 1, 2, 3].map(|i| a[i] + (b[i] - a[i]) * t);
        let length = mixed.iter().map(|c| c * c).sum::<f64>().sqrt();
        return mixed.map(|c| c / length);
    }
    let theta = dot.acos();
    let (wa, wb) = (
        ((1.0 - t) * theta).sin() / theta.sin(),
        (t * theta).sin() / theta.sin(),
    );
    [0, 1, 2, 3].map(|i| a[i] * wa + b[i] * wb)
}

impl CFrame {
    fn at(position: [f64; 3]) -> Self {
        Self {
            position,
            rows: IDENTITY,
        }
    }

    fn compose(&self, other: &Self) -> Self {
        let moved = apply(&self.rows, other.position);
        Self {
            position: [0, 1, 2].map(|i| self.position[i] + moved[i]),
            rows: multiply(&self.rows, &other.rows),
        }
    }

    fn inverse(&self) -> Self {
        let rows = transpose(&self.rows);
        let back = apply(&rows, self.position);
        Self {
            position: back.map(|c| -c),
            rows,
        }
    }

    fn point(&self, v: [f64; 3]) -> [f64; 3] {
        let turned = apply(&self.rows, v);
        [0, 1, 2].map(|i| self.position[i] + turned[i])
    }

    fn column(&self, i: usize) -> [f64; 3] {
        [self.rows[0][i], self.rows[1][i], self.rows[2][i]]
    }

    fn look_at(at: [f64; 3], target: [f64; 3], up: [f64; 3]) -> Self {
        let look = unit(sub(target, at));
        let right = unit(cross(look, up));
        let up = cross(right, look);
        Self {
            position: at,
            rows: [0, 1, 2].map(|i| [right[i], up[i], -look[i]]),
        }
    }

    fn euler_xyz(&self) -> (f64, f64, f64) {
        let r = &self.rows;
        let y = r[0][2].clamp(-1.0, 1.0).asin();
        let x = (-r[1][2]).atan2(r[2][2]);
        let z = (-r[0][1]).atan2(r[0][0]);
        (x, y, z)
    }

    fn components(&self) -> [f64; 12] {
        let [x, y, z] = self.position;
        let r = &self.rows;
        [
            x, y, z, r[0][0], r[0][1], r[0][2], r[1][0], r[1][1], r[1][2], r[2][0], r[2][1],
            r[2][2],
        ]
    }

    /// The `rbx_types` form, for attributes and properties.
    pub fn to_rbx(self) -> rbx::CFrame {
        let f = |v: [f64; 3]| rbx::Vector3::new(v[0] as f32, v[1] as f32, v[2] as f32);
        rbx::CFrame::new(
            f(self.position),
            rbx::Matrix3::new(f(self.rows[0]), f(self.rows[1]), f(self.rows[2])),
        )
    }

    /// From the `rbx_types` form.
    pub fn from_rbx(cframe: &rbx::CFrame) -> Self {
        let d = |v: rbx::Vector3| [f64::from(v.x), f64::from(v.y), f64::from(v.z)];
        let m = &cframe.orientation;
        Self {
            position: d(cframe.position),
            rows: [d(m.x), d(m.y), d(m.z)],
        }
    }
}

fn vector(v: [f64; 3]) -> Vector3 {
    Vector3::from_array(v)
}

impl FromLua for CFrame {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        match &value {
            Value::UserData(userdata) => userdata
                .borrow::<CFrame>()
                .map(|c| *c)
                .map_err(|_| error("CFrame expected")),
            other => Err(error(format!("CFrame expected, got {}", other.type_name()))),
        }
    }
}

impl UserData for CFrame {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "CFrame");
        fields.add_field_method_get("Position", |_, c| Ok(vector(c.position)));
        fields.add_field_method_get("p", |_, c| Ok(vector(c.position)));
        fields.add_field_method_get("X", |_, c| Ok(c.position[0]));
        fields.add_field_method_get("Y", |_, c| Ok(c.position[1]));
        fields.add_field_method_get("Z", |_, c| Ok(c.position[2]));
        fields.add_field_method_get("Rotation", |_, c| {
            Ok(CFrame {
                position: [0.0; 3],
                rows: c.rows,
            })
        });
        fields.add_field_method_get("RightVector", |_, c| Ok(vector(c.column(0))));
        fields.add_field_method_get("XVector", |_, c| Ok(vector(c.column(0))));
        fields.add_field_method_get("UpVector", |_, c| Ok(vector(c.column(1))));
        fields.add_field_method_get("YVector", |_, c| Ok(vector(c.column(1))));
        fields.add_field_method_get("ZVector", |_, c| Ok(vector(c.column(2))));
        fields.add_field_method_get("LookVector", |_, c| Ok(vector(c.column(2).map(|v| -v))));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("Inverse", |_, c, ()| Ok(c.inverse()));
        methods.add_method("ToWorldSpace", |_, c, other: CFrame| Ok(c.compose(&other)));
        methods.add_method("ToObjectSpace", |_, c, other: CFrame| {
            Ok(c.inverse().compose(&other))
        });
        methods.add_method("PointToWorldSpace", |_, c, v: Vector3| {
            Ok(vector(c.point(v.to_array())))
        });
        methods.add_method("PointToObjectSpace", |_, c, v: Vector3| {
            Ok(vector(c.inverse().point(v.to_array())))
        });
        methods.add_method("VectorToWorldSpace", |_, c, v: Vector3| {
            Ok(vector(apply(&c.rows, v.to_array())))
        });
        methods.add_method("VectorToObjectSpace", |_, c, v: Vector3| {
            Ok(vector(apply(&transpose(&c.rows), v.to_array())))
        });
        methods.add_method("Lerp", |_, a, (b, t): (CFrame, f64)| {
            let rows = from_quaternion(slerp(quaternion(&a.rows), quaternion(&b.rows), t));
            let position = [0, 1, 2].map(|i| a.position[i] + (b.position[i] - a.position[i]) * t);
            Ok(CFrame { position, rows })
        });
        methods.add_method("GetComponents", |_, c, ()| {
            Ok(MultiValue::from_iter(c.components().map(Value::Number)))
        });
        methods.add_method("components", |_, c, ()| {
            Ok(MultiValue::from_iter(c.components().map(Value::Number)))
        });
        methods.add_method("ToEulerAnglesXYZ", |_, c, ()| Ok(c.euler_xyz()));
        methods.add_method("ToOrientation", |_, c, ()| {
            let r = &c.rows;
            let x = (-r[1][2]).clamp(-1.0, 1.0).asin();
            let y = r[0][2].atan2(r[2][2]);
            let z = r[1][0].atan2(r[1][1]);
            Ok((x, y, z))
        });
        methods.add_meta_method(MetaMethod::Mul, |lua, a, other: Value| {
            if let Ok(b) = CFrame::from_lua(other.clone(), lua) {
                return Ok(Value::UserData(lua.create_userdata(a.compose(&b))?));
            }
            let v = Vector3::from_lua(other, lua)?;
            Ok(Value::UserData(
                lua.create_userdata(vector(a.point(v.to_array())))?,
            ))
        });
        methods.add_meta_method(MetaMethod::Add, |_, a, v: Vector3| {
            let d = v.to_array();
            Ok(CFrame {
                position: [0, 1, 2].map(|i| a.position[i] + d[i]),
                rows: a.rows,
            })
        });
        methods.add_meta_method(MetaMethod::Sub, |_, a, v: Vector3| {
            let d = v.to_array();
            Ok(CFrame {
                position: [0, 1, 2].map(|i| a.position[i] - d[i]),
                rows: a.rows,
            })
        });
        methods.add_meta_method(MetaMethod::Eq, |_, a, b: CFrame| Ok(*a == b));
        methods.add_meta_method(MetaMethod::ToString, |_, c, ()| {
            let parts: Vec<String> = c
                .components()
                .iter()
                .map(|n| Value::Number(*n).to_string().unwrap_or_default())
                .collect();
            Ok(parts.join(", "))
        });
    }
}

fn numbers(args: &MultiValue) -> mlua::Result<Vec<f64>> {
    args.iter()
        .map(|value| match value {
            Value::Integer(n) => Ok(*n as f64),
            Value::Number(n) => Ok(*n),
            other => Err(error(format!(
                "invalid argument to CFrame.new (number expected, got {})",
                other.type_name()
            ))),
        })
        .collect()
}

/// Installs the `CFrame` global.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let library: Table = lua.create_table()?;
    library.set(
        "new",
        lua.create_function(|lua, args: MultiValue| {
            let values: Vec<Value> = args.iter().cloned().collect();
            match values.as_slice() {
                [] => Ok(CFrame::at([0.0; 3])),
                [Value::UserData(_)] => Ok(CFrame::at(
                    Vector3::from_lua(values[0].clone(), lua)?.to_array(),
                )),
                [Value::UserData(_), Value::UserData(_)] => {
                    let at = Vector3::from_lua(values[0].clone(), lua)?.to_array();
                    let target = Vector3::from_lua(values[1].clone(), lua)?.to_array();
                    Ok(CFrame::look_at(at, target, [0.0, 1.0, 0.0]))
                }
                _ => match numbers(&args)?.as_slice() {
                    [x, y, z] => Ok(CFrame::at([*x, *y, *z])),
                    [x, y, z, r @ ..] if r.len() == 9 => Ok(CFrame {
                        position: [*x, *y, *z],
                        rows: [[r[0], r[1], r[2]], [r[3], r[4], r[5]], [r[6], r[7], r[8]]],
                    }),
                    _ => Err(error("Invalid number of arguments to CFrame.new")),
                },
            }
        })?,
    )?;
    let angles = lua.create_function(|_, (x, y, z): (f64, f64, f64)| {
        Ok(CFrame {
            position: [0.0; 3],
            rows: multiply(&multiply(&rotation_x(x), &rotation_y(y)), &rotation_z(z)),
        })
    })?;
    library.set("Angles", angles.clone())?;
    library.set("fromEulerAnglesXYZ", angles)?;
    let orientation = lua.create_function(|_, (x, y, z): (f64, f64, f64)| {
        Ok(CFrame {
            position: [0.0; 3],
            rows: multiply(&multiply(&rotation_y(y), &rotation_x(x)), &rotation_z(z)),
        })
    })?;
    library.set("fromEulerAnglesYXZ", orientation.clone())?;
    library.set("fromOrientation", orientation)?;
    library.set(
        "lookAt",
        lua.create_function(|_, (at, target, up): (Vector3, Vector3, Option<Vector3>)| {
            let up = up.map_or([0.0, 1.0, 0.0], |u| u.to_array());
            Ok(CFrame::look_at(at.to_array(), target.to_array(), up))
        })?,
    )?;
    library.set(
        "fromAxisAngle",
        lua.create_function(|_, (axis, angle): (Vector3, f64)| {
            let [x, y, z] = unit(axis.to_array());
            let (s, c) = (angle / 2.0).sin_cos();
            Ok(CFrame {
                position: [0.0; 3],
                rows: from_quaternion([c, x * s, y * s, z * s]),
            })
        })?,
    )?;
    library.set("identity", CFrame::at([0.0; 3]))?;
    library.set_readonly(true);
    lua.globals().set("CFrame", library)
}

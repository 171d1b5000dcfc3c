//! The strict Luau <-> JSON codec for stored values.
//!
//! Roblox stores DataStore values as JSON and rejects what JSON cannot hold faithfully. mlua's
//! serde conversion is not usable here: it silently drops the string keys of mixed tables and
//! the tail of sparse arrays, turns NaN into `null` and rounds integers above 2^53. This codec
//! follows Roblox's rules instead (reference §9.9):
//!
//! - tables with keys exactly `1..n` are arrays; tables with string keys are objects; a table
//!   whose length `#t` is 0 may also have numeric keys, which are stringified (`{[5]=true}`
//!   reads back as `{["5"]=true}`); anything else (sparse arrays, arrays with string keys,
//!   boolean or table keys, cycles) is rejected with error 104;
//! - strings must be valid UTF-8;
//! - dictionary keys are written sorted, so equal tables always store the same text;
//! - functions, threads, userdata (Instances, EnumItems, ...) and vectors are rejected with
//!   error 104 naming the value's type at top level, or the containing `Array`/`Dictionary`
//!   when nested;
//! - numbers are written in their shortest exact form, so integers up to 2^53 and every float
//!   (0.955 stays 0.955) round-trip bit for bit. Roblox accepts NaN and the infinities, which
//!   JSON cannot express; Blox stores them as the tokens `NaN`, `Infinity` and `-Infinity` and
//!   reads them back exactly (such values are not valid JSON for outside tools, as on Roblox).
//!
//! Encoding runs on the VM thread (it walks Luau tables); decoding text into [`Stored`] runs on
//! the database runtime, so the VM thread only converts the finished tree into Luau values.

use std::ffi::{c_int, c_void};
use std::fmt::Write as _;

use mlua::{Lua, Table, Value, ffi};

use crate::error::DataStoreError;

/// Roblox's limit on a serialized value, in characters of JSON.
pub const MAX_VALUE_LENGTH: usize = 4_194_304;

/// Nesting deeper than this is rejected, so neither direction can overflow the stack.
pub const MAX_DEPTH: usize = 256;

/// A decoded stored value, independent of any Luau state.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// JSON `null`; only hand-edited data holds it, and it reads back as `nil`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number, including NaN and the infinities.
    Number(f64),
    /// A UTF-8 string.
    String(String),
    /// An array, read back as a table with keys `1..n`.
    Array(Vec<Stored>),
    /// An object with string keys, in stored order.
    Object(Vec<(String, Stored)>),
}

/// Which kind of container holds the value being encoded; names it in error 104.
#[derive(Clone, Copy)]
enum Container {
    Top,
    Array,
    Dictionary,
}

impl Container {
    fn describe(self, value: &Value) -> String {
        match self {
            Container::Top => type_name(value),
            Container::Array => "Array".to_owned(),
            Container::Dictionary => "Dictionary".to_owned(),
        }
    }
}

/// The Roblox type name of a value that cannot be stored.
fn type_name(value: &Value) -> String {
    match value {
        Value::UserData(userdata) => userdata
            .type_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_else(|_| "userdata".to_owned()),
        Value::Vector(_) => "Vector3".to_owned(),
        Value::Table(table) => {
            if table.raw_len() > 0 {
                "Array".to_owned()
            } else {
                "Dictionary".to_owned()
            }
        }
        other => other.type_name().to_owned(),
    }
}

/// Encodes a Luau value as stored JSON text, enforcing Roblox's rules and the size limit.
pub fn encode(value: &Value) -> Result<String, DataStoreError> {
    let mut encoder = Encoder {
        // Most player records are a few hundred characters: start there instead of growing
        // through every power of two.
        out: String::with_capacity(256),
        path: Vec::new(),
    };
    encoder.value(value, Container::Top, 0)?;
    if encoder.out.len() > MAX_VALUE_LENGTH {
        return Err(DataStoreError::ValueTooLarge);
    }
    Ok(encoder.out)
}

struct Encoder {
    out: String,
    /// The tables being encoded, outermost first: a table met again on this path is a cycle.
    /// A list, not a set: it is never deeper than `MAX_DEPTH` and usually two or three long.
    path: Vec<*const c_void>,
}

impl Encoder {
    fn value(
        &mut self,
        value: &Value,
        container: Container,
        depth: usize,
    ) -> Result<(), DataStoreError> {
        let reject = || DataStoreError::CantStoreValue(container.describe(value));
        match value {
            Value::Nil => self.out.push_str("null"),
            Value::Boolean(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Integer(i) => write_number(&mut self.out, *i as f64),
            Value::Number(n) => write_number(&mut self.out, *n),
            Value::String(s) => {
                let bytes = s.as_bytes();
                let text = std::str::from_utf8(&bytes).map_err(|_| reject())?;
                write_string(&mut self.out, text);
            }
            Value::Table(table) => {
                if depth >= MAX_DEPTH {
                    return Err(reject());
                }
                let pointer = table.to_pointer();
                if self.path.contains(&pointer) {
                    return Err(reject());
                }
                self.path.push(pointer);
                let result = self.table(table, container, depth);
                self.path.pop();
                result?;
            }
            _ => return Err(reject()),
        }
        Ok(())
    }

    fn table(
        &mut self,
        table: &Table,
        container: Container,
        depth: usize,
    ) -> Result<(), DataStoreError> {
        let own_name = |len: usize| {
            if len > 0 { "Array" } else { "Dictionary" }
        };
        let length = table.raw_len();
        // `for_each` walks the table with Luau's raw iterator in one go; `pairs` would make a
        // protected call per entry, which was most of the encoding time of a SetAsync.
        let mut entries: Vec<(Value, Value)> = Vec::new();
        table
            .for_each(|key, value| {
                entries.push((key, value));
                Ok(())
            })
            .map_err(|_| self_reject(container, own_name(length)))?;
        let bad_shape = || self_reject(container, own_name(length));

        let all_integer_keys = entries.iter().all(|(k, _)| array_index(k).is_some());
        if entries.is_empty() || (length > 0 && all_integer_keys) {
            // An array: its keys must be exactly 1..n.
            if entries.len() != length {
                return Err(bad_shape());
            }
            let mut items: Vec<Option<&Value>> = vec![None; length];
            for (key, value) in &entries {
                let index = array_index(key).ok_or_else(bad_shape)?;
                match items.get_mut(index - 1) {
                    Some(slot @ None) => *slot = Some(value),
                    _ => return Err(bad_shape()),
                }
            }
            self.out.push('[');
            for (position, item) in items.into_iter().enumerate() {
                if position > 0 {
                    self.out.push(',');
                }
                self.value(item.ok_or_else(bad_shape)?, Container::Array, depth + 1)?;
            }
            self.out.push(']');
            return Ok(());
        }
        if length > 0 {
            // Mixed: an array part next to other keys.
            return Err(bad_shape());
        }
        let mut fields = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            let name = match key {
                Value::String(s) => {
                    let bytes = s.as_bytes();
                    std::str::from_utf8(&bytes)
                        .map_err(|_| bad_shape())?
                        .to_owned()
                }
                Value::Integer(i) => i.to_string(),
                Value::Number(n) if n.is_finite() => number_key(*n),
                _ => return Err(bad_shape()),
            };
            fields.push((name, value));
        }
        // Sorted, so equal tables always store the same text whatever Luau's hash order.
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        if fields.windows(2).any(|pair| pair[0].0 == pair[1].0) {
            // `{[5] = 1, ["5"] = 2}`: two keys that are the same once stringified.
            return Err(bad_shape());
        }
        self.out.push('{');
        for (position, (name, value)) in fields.into_iter().enumerate() {
            if position > 0 {
                self.out.push(',');
            }
            write_string(&mut self.out, &name);
            self.out.push(':');
            self.value(value, Container::Dictionary, depth + 1)?;
        }
        self.out.push('}');
        Ok(())
    }
}

fn self_reject(container: Container, own: &str) -> DataStoreError {
    DataStoreError::CantStoreValue(match container {
        Container::Top => own.to_owned(),
        Container::Array => "Array".to_owned(),
        Container::Dictionary => "Dictionary".to_owned(),
    })
}

/// The 1-based index a key stands for, when it is a positive integer.
fn array_index(key: &Value) -> Option<usize> {
    match key {
        Value::Integer(i) if *i >= 1 => usize::try_from(*i).ok(),
        Value::Number(n) if n.fract() == 0.0 && *n >= 1.0 && *n <= 9_007_199_254_740_992.0 => {
            Some(*n as usize)
        }
        _ => None,
    }
}

/// How a numeric key of a length-0 table is stringified (as Luau's `tostring` would).
fn number_key(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Writes `n` in the shortest form that parses back to the same bits.
pub(crate) fn write_number(out: &mut String, n: f64) {
    if n.is_nan() {
        out.push_str("NaN");
    } else if n.is_infinite() {
        out.push_str(if n > 0.0 { "Infinity" } else { "-Infinity" });
    } else if n == 0.0 {
        out.push_str(if n.is_sign_negative() { "-0" } else { "0" });
    } else if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
        let _ = write!(out, "{}", n as i64);
    } else {
        // Rust's Debug output is the shortest representation that round-trips, in a form JSON
        // accepts ("0.955", "1e300", "1.5e-7").
        let _ = write!(out, "{n:?}");
    }
}

fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses stored JSON text. Fails only on text that Blox did not write (a hand-edited row).
pub fn decode(text: &str) -> Result<Stored, DataStoreError> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        position: 0,
    };
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.position != parser.bytes.len() {
        return Err(parser.error());
    }
    Ok(value)
}

struct Parser<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Parser<'_> {
    fn error(&self) -> DataStoreError {
        DataStoreError::Corrupt(format!("invalid stored JSON at byte {}", self.position))
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.position) {
            self.position += 1;
        }
    }

    fn eat(&mut self, literal: &str) -> bool {
        if self.bytes[self.position..].starts_with(literal.as_bytes()) {
            self.position += literal.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Stored, DataStoreError> {
        if depth > MAX_DEPTH {
            return Err(self.error());
        }
        self.skip_whitespace();
        match self.bytes.get(self.position) {
            Some(b'{') => {
                self.position += 1;
                let mut fields = Vec::new();
                self.skip_whitespace();
                if self.eat("}") {
                    return Ok(Stored::Object(fields));
                }
                loop {
                    self.skip_whitespace();
                    let key = self.string()?;
                    self.skip_whitespace();
                    if !self.eat(":") {
                        return Err(self.error());
                    }
                    fields.push((key, self.value(depth + 1)?));
                    self.skip_whitespace();
                    if self.eat("}") {
                        return Ok(Stored::Object(fields));
                    }
                    if !self.eat(",") {
                        return Err(self.error());
                    }
                }
            }
            Some(b'[') => {
                self.position += 1;
                let mut items = Vec::new();
                self.skip_whitespace();
                if self.eat("]") {
                    return Ok(Stored::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.skip_whitespace();
                    if self.eat("]") {
                        return Ok(Stored::Array(items));
                    }
                    if !self.eat(",") {
                        return Err(self.error());
                    }
                }
            }
            Some(b'"') => Ok(Stored::String(self.string()?)),
            Some(_) if self.eat("true") => Ok(Stored::Bool(true)),
            Some(_) if self.eat("false") => Ok(Stored::Bool(false)),
            Some(_) if self.eat("null") => Ok(Stored::Null),
            Some(_) if self.eat("NaN") => Ok(Stored::Number(f64::NAN)),
            Some(_) if self.eat("Infinity") => Ok(Stored::Number(f64::INFINITY)),
            Some(_) if self.eat("-Infinity") => Ok(Stored::Number(f64::NEG_INFINITY)),
            Some(_) => self.number(),
            None => Err(self.error()),
        }
    }

    fn number(&mut self) -> Result<Stored, DataStoreError> {
        let start = self.position;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') =
            self.bytes.get(self.position)
        {
            self.position += 1;
        }
        std::str::from_utf8(&self.bytes[start..self.position])
            .ok()
            .and_then(|text| text.parse::<f64>().ok())
            .map(Stored::Number)
            .ok_or_else(|| self.error())
    }

    fn string(&mut self) -> Result<String, DataStoreError> {
        if !self.eat("\"") {
            return Err(self.error());
        }
        let mut out = String::new();
        loop {
            let start = self.position;
            while let Some(&b) = self.bytes.get(self.position) {
                if b == b'"' || b == b'\\' {
                    break;
                }
                self.position += 1;
            }
            out.push_str(
                std::str::from_utf8(&self.bytes[start..self.position]).map_err(|_| self.error())?,
            );
            match self.bytes.get(self.position) {
                Some(b'"') => {
                    self.position += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.position += 1;
                    let escape = *self.bytes.get(self.position).ok_or_else(|| self.error())?;
                    self.position += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => out.push(self.unicode_escape()?),
                        _ => return Err(self.error()),
                    }
                }
                _ => return Err(self.error()),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, DataStoreError> {
        let digits = self
            .bytes
            .get(self.position..self.position + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or_else(|| self.error())?;
        self.position += 4;
        Ok(digits)
    }

    fn unicode_escape(&mut self) -> Result<char, DataStoreError> {
        let high = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&high) && self.eat("\\u") {
            let low = self.hex4()?;
            0x10000 + ((high - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF)
        } else {
            high
        };
        char::from_u32(code).ok_or_else(|| self.error())
    }
}

/// Builds the Luau value for a decoded tree: a fresh table every time, so scripts can mutate
/// what they read without touching anything else.
///
/// This is the one place the VM thread turns every value a script reads into Luau, so it
/// builds the whole tree inside a single protected call with Luau's C API. Through mlua's safe
/// API each string and each table slot would be a protected call of its own, which made this
/// conversion the largest cost of a `GetAsync` on the VM thread (BENCHMARKS.md).
#[allow(unsafe_code)]
pub fn to_lua(lua: &Lua, stored: &Stored) -> mlua::Result<Value> {
    // SAFETY: `exec_raw` runs the closure as a protected Luau call, so an allocation failure
    // raised by any function below unwinds to mlua, which returns it as an error. The closure
    // leaves exactly one value on the stack, checks the stack before every push, and passes
    // only pointers and lengths of live Rust strings.
    unsafe { lua.exec_raw((), |state| push_stored(state, stored)) }
}

/// Pushes `stored` onto the Luau stack of `state`.
#[allow(unsafe_code)]
unsafe fn push_stored(state: *mut ffi::lua_State, stored: &Stored) {
    // SAFETY (for every call below): `state` is the live state `exec_raw` handed over, inside a
    // protected call; `luaL_checkstack` guarantees the room every push needs (a table, a key
    // and a value at each level; `MAX_DEPTH` bounds the levels).
    unsafe {
        ffi::luaL_checkstack(state, 3, c"stored value".as_ptr());
        match stored {
            Stored::Null => ffi::lua_pushnil(state),
            Stored::Bool(b) => ffi::lua_pushboolean(state, c_int::from(*b)),
            Stored::Number(n) => ffi::lua_pushnumber(state, *n),
            Stored::String(text) => push_text(state, text),
            Stored::Array(items) => {
                ffi::lua_createtable(state, table_size(items.len()), 0);
                for (index, item) in (1..).zip(items) {
                    push_stored(state, item);
                    ffi::lua_rawseti(state, -2, index);
                }
            }
            Stored::Object(fields) => {
                ffi::lua_createtable(state, 0, table_size(fields.len()));
                for (key, item) in fields {
                    push_text(state, key);
                    push_stored(state, item);
                    ffi::lua_rawset(state, -3);
                }
            }
        }
    }
}

#[allow(unsafe_code)]
unsafe fn push_text(state: *mut ffi::lua_State, text: &str) {
    // SAFETY: the pointer and length come from a live `&str`; Luau copies the bytes.
    unsafe {
        ffi::lua_pushlstring(state, text.as_ptr().cast(), text.len());
    }
}

/// A size hint for `lua_createtable`; stored values are far below `c_int::MAX` entries.
fn table_size(len: usize) -> c_int {
    c_int::try_from(len).unwrap_or(c_int::MAX)
}

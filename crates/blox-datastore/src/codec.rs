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
//! Encoding runs on the VM thread (it walks Luau tables). A value a call read is parsed there
//! too, straight into Luau ([`text_to_lua`]), since the VM thread polls every call's database
//! work; decoding text into a [`Stored`] tree serves work on database threads (`OnUpdate`
//! polling) and the few reads whose value is kept decoded. Both read the text with one
//! tokenizer, so they accept and reject exactly the same texts.

use std::borrow::Cow;
use std::ffi::{c_int, c_void};
use std::fmt::Write as _;

use mlua::{Lua, Value, ffi};

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
    /// The name error 104 gives a value that cannot be stored here: the value's own type at
    /// top level, the containing `Array`/`Dictionary` when nested.
    fn reject(self, own: impl FnOnce() -> String) -> DataStoreError {
        DataStoreError::CantStoreValue(match self {
            Container::Top => own(),
            Container::Array => "Array".to_owned(),
            Container::Dictionary => "Dictionary".to_owned(),
        })
    }
}

/// Encodes a Luau value as stored JSON text, enforcing Roblox's rules and the size limit.
///
/// Encoding is most of the VM thread's share of a SetAsync, so it walks the value with Luau's
/// C API inside one protected call: raw iteration straight off the table, strings read in
/// place. Through mlua's safe API every entry would become two registry references and every
/// key an owned copy (callgrind: 23,000 instructions per encode of the benchmark's player
/// table that way, BENCHMARKS.md).
#[allow(unsafe_code)]
pub fn encode(lua: &Lua, value: &Value) -> Result<String, DataStoreError> {
    let mut encoder = Encoder {
        // Most player records are a few hundred characters: start there instead of growing
        // through every power of two.
        out: String::with_capacity(256),
        path: Vec::new(),
    };
    let mut outcome = Ok(());
    // SAFETY: `exec_raw` pushes `value` as the one argument of a protected call and hands over
    // its live state. The stack room every level needs is checked with the non-raising
    // `lua_checkstack`, and the walk only reads (raw iteration, raw gets, strings in place): it
    // runs no metamethods and modifies no table, so strings borrowed from the stack stay alive
    // with the tables holding them. The one call that can allocate (the `__type` lookup that
    // names a rejected userdata) raises at worst an out-of-memory error, which unwinds to the
    // protected call and comes back from `exec_raw` as an error.
    let called = unsafe {
        lua.exec_raw::<()>(value, |state| {
            outcome = encoder.value(state, 1, Container::Top, 0);
            ffi::lua_settop(state, 0);
        })
    };
    if let Err(error) = called {
        // Luau could not run the protected call at all (mlua reports an allocation failure
        // here); nothing was encoded, so nothing is written.
        return Err(DataStoreError::Luau(blox_scheduler::error_message(&error)));
    }
    outcome?;
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

/// Stack slots one nesting level uses: a key and a value from the raw iterator.
const SLOTS_PER_LEVEL: c_int = 2;

#[allow(unsafe_code)]
impl Encoder {
    /// Encodes the value at absolute stack index `index`.
    ///
    /// # Safety
    /// `state` is a live Luau state inside a protected call, and `index` a valid absolute
    /// index on its stack.
    unsafe fn value(
        &mut self,
        state: *mut ffi::lua_State,
        index: c_int,
        container: Container,
        depth: usize,
    ) -> Result<(), DataStoreError> {
        // SAFETY: as the function's contract; every read below is of the value at `index`.
        unsafe {
            match ffi::lua_type(state, index) {
                ffi::LUA_TNIL => self.out.push_str("null"),
                ffi::LUA_TBOOLEAN => self.out.push_str(if ffi::lua_toboolean(state, index) != 0 {
                    "true"
                } else {
                    "false"
                }),
                ffi::LUA_TNUMBER => write_number(&mut self.out, ffi::lua_tonumber(state, index)),
                ffi::LUA_TINTEGER => write_number(
                    &mut self.out,
                    ffi::lua_tointeger64(state, index, std::ptr::null_mut()) as f64,
                ),
                ffi::LUA_TSTRING => {
                    let text = string_at(state, index)
                        .ok_or_else(|| container.reject(|| "string".to_owned()))?;
                    write_string(&mut self.out, text);
                }
                ffi::LUA_TTABLE => {
                    let reject = || container.reject(|| table_kind(state, index).to_owned());
                    if depth >= MAX_DEPTH || ffi::lua_checkstack(state, SLOTS_PER_LEVEL) == 0 {
                        return Err(reject());
                    }
                    let pointer = ffi::lua_topointer(state, index);
                    if self.path.contains(&pointer) {
                        return Err(reject());
                    }
                    self.path.push(pointer);
                    let result = self.table(state, index, container, depth);
                    self.path.pop();
                    result?;
                }
                other => return Err(container.reject(|| unstorable_type(state, index, other))),
            }
        }
        Ok(())
    }

    /// Encodes the table at absolute stack index `table` as an array (keys exactly `1..n`) or
    /// a dictionary with sorted keys.
    ///
    /// # Safety
    /// As [`Encoder::value`], with a table at `table` and room for two more stack slots.
    unsafe fn table(
        &mut self,
        state: *mut ffi::lua_State,
        table: c_int,
        container: Container,
        depth: usize,
    ) -> Result<(), DataStoreError> {
        // SAFETY: as the function's contract. `lua_rawiter` pushes a key and a value (the two
        // checked slots), popped before the next step; an unmodified table iterates the same
        // way every time, so a saved iterator position finds its entry again.
        unsafe {
            let length = ffi::lua_objlen(state, table);
            let bad_shape = || container.reject(|| table_kind(state, table).to_owned());
            if length > 0 {
                // An array: every key an index in 1..=n, as many entries as the length says.
                let mut entries = 0;
                let mut position = ffi::lua_rawiter(state, table, 0);
                while position >= 0 {
                    let index = array_index(state, -2);
                    ffi::lua_pop(state, 2);
                    if index.is_none_or(|index| index > length) {
                        return Err(bad_shape());
                    }
                    entries += 1;
                    position = ffi::lua_rawiter(state, table, position);
                }
                if entries != length {
                    return Err(bad_shape());
                }
                self.out.push('[');
                for index in 1..=length {
                    if index > 1 {
                        self.out.push(',');
                    }
                    ffi::lua_rawgeti(state, table, index as _);
                    let item = ffi::lua_gettop(state);
                    let result = self.value(state, item, Container::Array, depth + 1);
                    ffi::lua_pop(state, 1);
                    result?;
                }
                self.out.push(']');
                return Ok(());
            }
            // A dictionary (or the empty table, stored as `[]`): every key named first, so a
            // bad key is reported before any value is looked at, then the values in key order.
            let mut fields: Vec<(KeyName<'_>, c_int)> = Vec::new();
            let mut at = 0;
            let mut next = ffi::lua_rawiter(state, table, at);
            while next >= 0 {
                let name = key_name(state, -2);
                ffi::lua_pop(state, 2);
                fields.push((name.ok_or_else(bad_shape)?, at));
                at = next;
                next = ffi::lua_rawiter(state, table, at);
            }
            if fields.is_empty() {
                self.out.push_str("[]");
                return Ok(());
            }
            // Sorted, so equal tables always store the same text whatever Luau's hash order.
            fields.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            if fields
                .windows(2)
                .any(|pair| pair[0].0.as_str() == pair[1].0.as_str())
            {
                // `{[5] = 1, ["5"] = 2}`: two keys that are the same once stringified.
                return Err(bad_shape());
            }
            self.out.push('{');
            for (position, (name, at)) in fields.iter().enumerate() {
                if position > 0 {
                    self.out.push(',');
                }
                write_string(&mut self.out, name.as_str());
                self.out.push(':');
                ffi::lua_rawiter(state, table, *at);
                let item = ffi::lua_gettop(state);
                let result = self.value(state, item, Container::Dictionary, depth + 1);
                ffi::lua_pop(state, 2);
                result?;
            }
            self.out.push('}');
        }
        Ok(())
    }
}

/// A dictionary key as stored: a Luau string read in place, or a stringified number.
enum KeyName<'a> {
    Borrowed(&'a str),
    Number(String),
}

impl KeyName<'_> {
    fn as_str(&self) -> &str {
        match self {
            KeyName::Borrowed(text) => text,
            KeyName::Number(text) => text,
        }
    }
}

/// The UTF-8 text of the string at `index`, borrowed from Luau; `None` for invalid UTF-8.
///
/// # Safety
/// The value at `index` is a string that outlives the returned borrow.
#[allow(unsafe_code)]
unsafe fn string_at<'a>(state: *mut ffi::lua_State, index: c_int) -> Option<&'a str> {
    let mut length = 0;
    // SAFETY: for a string value `lua_tolstring` converts nothing and returns a pointer to its
    // `length` bytes, which live as long as the string.
    let bytes = unsafe {
        let pointer = ffi::lua_tolstring(state, index, &mut length);
        std::slice::from_raw_parts(pointer.cast::<u8>(), length)
    };
    std::str::from_utf8(bytes).ok()
}

/// How a dictionary key is stored: strings as they are (UTF-8 only), numbers as
/// [`number_key`] writes them; `None` for any other key.
///
/// # Safety
/// As [`string_at`], for the key at `index`.
#[allow(unsafe_code)]
unsafe fn key_name<'a>(state: *mut ffi::lua_State, index: c_int) -> Option<KeyName<'a>> {
    // SAFETY: as the function's contract; numbers are read, never converted in place.
    unsafe {
        match ffi::lua_type(state, index) {
            ffi::LUA_TSTRING => string_at(state, index).map(KeyName::Borrowed),
            ffi::LUA_TNUMBER => {
                let n = ffi::lua_tonumber(state, index);
                n.is_finite().then(|| KeyName::Number(number_key(n)))
            }
            ffi::LUA_TINTEGER => Some(KeyName::Number(
                ffi::lua_tointeger64(state, index, std::ptr::null_mut()).to_string(),
            )),
            _ => None,
        }
    }
}

/// -2^63 as a float: whole-number keys from here up to (not including) 2^63 fit an `i64`.
const I64_RANGE_START: f64 = i64::MIN as f64;

/// The 1-based array index a key stands for, when it is a positive whole number.
///
/// # Safety
/// `index` is a valid stack index of `state`.
#[allow(unsafe_code)]
unsafe fn array_index(state: *mut ffi::lua_State, index: c_int) -> Option<usize> {
    // SAFETY: as the function's contract; only reads.
    unsafe {
        match ffi::lua_type(state, index) {
            ffi::LUA_TNUMBER => {
                let n = ffi::lua_tonumber(state, index);
                (n.fract() == 0.0 && n >= 1.0).then_some(n as usize)
            }
            ffi::LUA_TINTEGER => {
                usize::try_from(ffi::lua_tointeger64(state, index, std::ptr::null_mut()))
                    .ok()
                    .filter(|index| *index >= 1)
            }
            _ => None,
        }
    }
}

/// What error 104 calls a table that cannot be stored: by its length, as Roblox does.
///
/// # Safety
/// The value at `index` is a table.
#[allow(unsafe_code)]
unsafe fn table_kind(state: *mut ffi::lua_State, index: c_int) -> &'static str {
    // SAFETY: as the function's contract.
    if unsafe { ffi::lua_objlen(state, index) } > 0 {
        "Array"
    } else {
        "Dictionary"
    }
}

/// The Roblox type name of a value that cannot be stored: a userdata's `__type` (Instance,
/// EnumItem, ...), `Vector3` for vectors, else the Luau type.
///
/// # Safety
/// `index` is a valid absolute stack index of `state`, with one free slot above the top.
#[allow(unsafe_code)]
unsafe fn unstorable_type(state: *mut ffi::lua_State, index: c_int, kind: c_int) -> String {
    // SAFETY: as the function's contract; `luaL_getmetafield` reads the metatable raw and
    // pushes the field only when it finds one.
    unsafe {
        match kind {
            ffi::LUA_TVECTOR => "Vector3".to_owned(),
            ffi::LUA_TLIGHTUSERDATA => "lightuserdata".to_owned(),
            ffi::LUA_TUSERDATA => {
                let found = ffi::luaL_getmetafield(state, index, c"__type".as_ptr());
                let name = match found {
                    ffi::LUA_TSTRING => string_at(state, -1).unwrap_or("userdata").to_owned(),
                    _ => "userdata".to_owned(),
                };
                if found != ffi::LUA_TNIL {
                    ffi::lua_pop(state, 1);
                }
                name
            }
            other => std::ffi::CStr::from_ptr(ffi::lua_typename(state, other))
                .to_string_lossy()
                .into_owned(),
        }
    }
}

/// How a numeric key of a length-0 table is stringified: whole numbers in the `i64` range in
/// full (`2^60` as `1152921504606846976`, as mlua's integer conversion read them), others in
/// their shortest form.
fn number_key(n: f64) -> String {
    if n.fract() == 0.0 && (I64_RANGE_START..-I64_RANGE_START).contains(&n) {
        (n as i64).to_string()
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
        push_integer(out, n as i64);
    } else {
        // Rust's Debug output is the shortest representation that round-trips, in a form JSON
        // accepts ("0.955", "1e300", "1.5e-7").
        let _ = write!(out, "{n:?}");
    }
}

/// Writes `value` in decimal; the common case of every stored number, so without `fmt`'s
/// machinery.
fn push_integer(out: &mut String, value: i64) {
    if value < 0 {
        out.push('-');
    }
    push_decimal(out, value.unsigned_abs(), 1);
}

/// Writes `value` in decimal, zero-padded to at least `width` digits (at most 20).
pub(crate) fn push_decimal(out: &mut String, value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let start = start.min(digits.len() - width.min(digits.len()));
    out.extend(digits[start..].iter().map(|&digit| char::from(digit)));
}

/// Writes `text` as a JSON string. Only ASCII bytes are ever escaped, so the text between them
/// is copied as whole runs, which keeps every multi-byte character intact.
pub(crate) fn write_string(out: &mut String, text: &str) {
    out.push('"');
    let mut run_start = 0;
    for (at, byte) in text.bytes().enumerate() {
        let short_escape = match byte {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.push_str(&text[run_start..at]);
        match short_escape {
            Some(escape) => out.push_str(escape),
            None => {
                let _ = write!(out, "\\u{byte:04x}");
            }
        }
        run_start = at + 1;
    }
    out.push_str(&text[run_start..]);
    out.push('"');
}

/// Parses stored JSON text. Fails only on text that Blox did not write (a hand-edited row).
///
/// It allocates each string and each container once, at its final size: the parse first
/// lists the value's tokens, with each container's member count, and the tree is built from
/// that list.
pub fn decode(text: &str) -> Result<Stored, DataStoreError> {
    let tokens = tokenize(text)?;
    Ok(build(&mut tokens.into_iter()))
}

/// Parses stored JSON text straight into a fresh Luau value, as [`to_lua`] of [`decode`]
/// would, without the tree in between: no string is copied unless it holds escapes, and
/// nothing is left to free but one list of tokens.
///
/// For reads whose database work the VM thread polls itself (PostgreSQL's), where building
/// and then dropping the tree on that thread cost about a sixth of a `GetAsync`
/// (BENCHMARKS.md, session 11). Malformed text fails before any Luau value is made.
#[allow(unsafe_code)]
pub fn text_to_lua(lua: &Lua, text: &str) -> mlua::Result<Value> {
    let tokens = tokenize(text)?;
    // SAFETY: as in `to_lua`: a protected call, one value left on the stack, the stack checked
    // before every push. The tokens come from `tokenize`, so they form exactly one value and
    // nest no deeper than `MAX_DEPTH`.
    unsafe { lua.exec_raw((), |state| push_token(state, &mut tokens.iter())) }
}

/// One step of a parsed value, in text order. A container's token gives its member count and
/// is followed by its members: values for an array, key and value pairs for an object.
#[derive(Debug)]
enum Token<'a> {
    Null,
    Bool(bool),
    Number(f64),
    /// A string, borrowed from the text unless it held escapes.
    String(Cow<'a, str>),
    Array(usize),
    Object(usize),
}

/// The most tokens [`tokenize`] reserves room for before it has read any.
const MAX_TOKENS_RESERVED: usize = 256;

/// The tokens of the one value that `text` holds.
fn tokenize(text: &str) -> Result<Vec<Token<'_>>, DataStoreError> {
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        position: 0,
        // About one token per 6 bytes of a typical player value; the guess only saves regrowing
        // the list for small values, so it is capped: a 4 MB string is one token, not 700,000.
        tokens: Vec::with_capacity((text.len() / 6 + 1).min(MAX_TOKENS_RESERVED)),
    };
    parser.value(0)?;
    parser.skip_whitespace();
    if parser.position != parser.bytes.len() {
        return Err(parser.error());
    }
    Ok(parser.tokens)
}

/// The value whose tokens `tokens` starts with, consuming them.
fn build<'a>(tokens: &mut impl Iterator<Item = Token<'a>>) -> Stored {
    match tokens.next() {
        None | Some(Token::Null) => Stored::Null,
        Some(Token::Bool(b)) => Stored::Bool(b),
        Some(Token::Number(n)) => Stored::Number(n),
        Some(Token::String(text)) => Stored::String(text.into_owned()),
        Some(Token::Array(len)) => Stored::Array((0..len).map(|_| build(tokens)).collect()),
        Some(Token::Object(len)) => Stored::Object(
            (0..len)
                .map(|_| {
                    let key = match tokens.next() {
                        Some(Token::String(key)) => key.into_owned(),
                        _ => String::new(),
                    };
                    (key, build(tokens))
                })
                .collect(),
        ),
    }
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    position: usize,
    tokens: Vec<Token<'a>>,
}

impl<'a> Parser<'a> {
    fn error(&self) -> DataStoreError {
        DataStoreError::Corrupt(format!("invalid stored JSON at byte {}", self.position))
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.position) {
            self.position += 1;
        }
    }

    fn eat_byte(&mut self, byte: u8) -> bool {
        if self.bytes.get(self.position) == Some(&byte) {
            self.position += 1;
            true
        } else {
            false
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

    /// Appends the tokens of the value at the current position.
    fn value(&mut self, depth: usize) -> Result<(), DataStoreError> {
        if depth > MAX_DEPTH {
            return Err(self.error());
        }
        self.skip_whitespace();
        let token = match self.bytes.get(self.position) {
            Some(b'{') => {
                self.position += 1;
                let container = self.tokens.len();
                self.tokens.push(Token::Object(0));
                let mut len = 0;
                self.skip_whitespace();
                if !self.eat_byte(b'}') {
                    loop {
                        self.skip_whitespace();
                        let key = self.string()?;
                        self.tokens.push(Token::String(key));
                        self.skip_whitespace();
                        if !self.eat_byte(b':') {
                            return Err(self.error());
                        }
                        self.value(depth + 1)?;
                        len += 1;
                        self.skip_whitespace();
                        if self.eat_byte(b'}') {
                            break;
                        }
                        if !self.eat_byte(b',') {
                            return Err(self.error());
                        }
                    }
                }
                self.tokens[container] = Token::Object(len);
                return Ok(());
            }
            Some(b'[') => {
                self.position += 1;
                let container = self.tokens.len();
                self.tokens.push(Token::Array(0));
                let mut len = 0;
                self.skip_whitespace();
                if !self.eat_byte(b']') {
                    loop {
                        self.value(depth + 1)?;
                        len += 1;
                        self.skip_whitespace();
                        if self.eat_byte(b']') {
                            break;
                        }
                        if !self.eat_byte(b',') {
                            return Err(self.error());
                        }
                    }
                }
                self.tokens[container] = Token::Array(len);
                return Ok(());
            }
            Some(b'"') => Token::String(self.string()?),
            // The words are told apart by their first byte, so a number (the common case)
            // is not compared against each of them first.
            Some(b't') if self.eat("true") => Token::Bool(true),
            Some(b'f') if self.eat("false") => Token::Bool(false),
            Some(b'n') if self.eat("null") => Token::Null,
            Some(b'N') if self.eat("NaN") => Token::Number(f64::NAN),
            Some(b'I') if self.eat("Infinity") => Token::Number(f64::INFINITY),
            Some(b'-') if self.eat("-Infinity") => Token::Number(f64::NEG_INFINITY),
            Some(b'-' | b'0'..=b'9') => Token::Number(self.number()?),
            _ => return Err(self.error()),
        };
        self.tokens.push(token);
        Ok(())
    }

    fn number(&mut self) -> Result<f64, DataStoreError> {
        let start = self.position;
        let mut integer = true;
        while let Some(&b) = self.bytes.get(self.position) {
            match b {
                b'0'..=b'9' => {}
                b'-' if self.position == start => {}
                b'-' | b'+' | b'.' | b'e' | b'E' => integer = false,
                _ => break,
            }
            self.position += 1;
        }
        let text = self
            .text
            .get(start..self.position)
            .ok_or_else(|| self.error())?;
        // Most stored numbers are small integers (money, levels, counts): below 2^53 their
        // digits give the exact value without the general float parser.
        let digits = text.strip_prefix('-').unwrap_or(text);
        if integer && !digits.is_empty() && digits.len() <= 15 {
            let magnitude = digits
                .bytes()
                .fold(0_u64, |value, digit| value * 10 + u64::from(digit - b'0'));
            let magnitude = magnitude as f64;
            return Ok(if digits.len() == text.len() {
                magnitude
            } else {
                -magnitude
            });
        }
        text.parse::<f64>().map_err(|_| self.error())
    }

    fn string(&mut self) -> Result<Cow<'a, str>, DataStoreError> {
        if !self.eat_byte(b'"') {
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
            // Both ends sit next to ASCII bytes (quotes, backslashes, escapes), so the slice of
            // the already valid text needs no second UTF-8 check.
            let run = self
                .text
                .get(start..self.position)
                .ok_or_else(|| self.error())?;
            match self.bytes.get(self.position) {
                Some(b'"') => {
                    self.position += 1;
                    if out.is_empty() {
                        return Ok(Cow::Borrowed(run));
                    }
                    out.push_str(run);
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    out.push_str(run);
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

/// Pushes the value whose tokens `tokens` starts with onto the Luau stack of `state`.
#[allow(unsafe_code)]
unsafe fn push_token(state: *mut ffi::lua_State, tokens: &mut std::slice::Iter<'_, Token<'_>>) {
    // SAFETY (for every call below): as in `push_stored`; the tokenizer's depth limit bounds
    // the levels.
    unsafe {
        ffi::luaL_checkstack(state, 3, c"stored value".as_ptr());
        match tokens.next() {
            None | Some(Token::Null) => ffi::lua_pushnil(state),
            Some(Token::Bool(b)) => ffi::lua_pushboolean(state, c_int::from(*b)),
            Some(Token::Number(n)) => ffi::lua_pushnumber(state, *n),
            Some(Token::String(text)) => push_text(state, text),
            Some(Token::Array(len)) => {
                ffi::lua_createtable(state, table_size(*len), 0);
                for index in (1..).take(*len) {
                    push_token(state, tokens);
                    ffi::lua_rawseti(state, -2, index);
                }
            }
            Some(Token::Object(len)) => {
                ffi::lua_createtable(state, 0, table_size(*len));
                for _ in 0..*len {
                    match tokens.next() {
                        Some(Token::String(key)) => push_text(state, key),
                        _ => push_text(state, ""),
                    }
                    push_token(state, tokens);
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

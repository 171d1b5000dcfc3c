//! `ListKeysAsync` and its pages: `DataStoreKeyPages` of `DataStoreKey` items.
//!
//! Pages use keyset pagination over the primary key (scope, key): each page is one index
//! range scan starting after the previous page's last key, so a page costs the same at key
//! 10 as at key 1,000,000, and keys written meanwhile never shift a page. The cursor handed
//! to scripts encodes that last (scope, key); it is opaque to them, as on Roblox.

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{MetaMethod, UserData, UserDataFields, UserDataMethods};

use crate::DataStoreError;
use crate::backend::{KeyListing, prefix_end, unescape_stored_text};
use crate::service::DataStoreContext;

/// Keys per page when the script passes 0 (or nothing), as Roblox's backend does.
pub const DEFAULT_KEY_PAGE_SIZE: i64 = 50;

/// Where the next page starts: after this (scope, key), in stored form.
type Position = (String, String);

/// What a `ListKeysAsync` call lists, independent of the page.
#[derive(Debug, Clone)]
pub(crate) struct KeyQuery {
    pub(crate) listing: KeyListing,
    pub(crate) page_size: i64,
    /// Under AllScopes, key names come back as "scope/key".
    pub(crate) qualified: bool,
    pub(crate) store_name: String,
}

impl KeyQuery {
    /// The listing of keys starting with `prefix`: in one scope, or under AllScopes in
    /// every scope, where the prefix applies to "scope/key".
    pub(crate) fn listing_for(base: KeyListing, scope: Option<&str>, prefix: &str) -> KeyListing {
        let mut listing = base;
        let exact = |scope: &str| (scope.to_owned(), Some(format!("{scope}\u{1}")));
        let stored_prefix = crate::backend::stored_text(prefix);
        match scope {
            // Stored text never holds NUL, so [s, s + U+0001) holds exactly the scope s:
            // every other stored scope starting with s continues with U+0001 or above.
            Some(scope) => {
                (listing.scope_from, listing.scope_to) = exact(scope);
                listing.key_to = prefix_end(&stored_prefix);
                listing.key_from = stored_prefix;
            }
            None => match prefix.split_once('/') {
                Some((scope, key_prefix)) => {
                    (listing.scope_from, listing.scope_to) =
                        exact(&crate::backend::stored_text(scope));
                    let key_prefix = crate::backend::stored_text(key_prefix);
                    listing.key_to = prefix_end(&key_prefix);
                    listing.key_from = key_prefix;
                }
                None => {
                    listing.scope_to = prefix_end(&stored_prefix);
                    listing.scope_from = stored_prefix;
                }
            },
        }
        listing
    }

    /// Fetches the page after `after`: its key names and where the next page starts, if
    /// there is one.
    pub(crate) async fn fetch(
        &self,
        context: &DataStoreContext,
        after: Position,
    ) -> mlua::Result<(Vec<String>, Option<Position>)> {
        let mut listing = self.listing.clone();
        listing.after = after;
        listing.limit = self.page_size + 1;
        let mut rows = context
            .run(
                "ListKeysAsync",
                &self.store_name,
                move |backend| async move { Ok(backend.list_keys(&listing).await?) },
            )
            .await?;
        let more = rows.len() as i64 > self.page_size;
        rows.truncate(self.page_size as usize);
        let next = if more { rows.last().cloned() } else { None };
        let names = rows
            .iter()
            .map(|(scope, key)| {
                let key = unescape_stored_text(key);
                if self.qualified {
                    format!("{}/{key}", unescape_stored_text(scope))
                } else {
                    key
                }
            })
            .collect();
        Ok((names, next))
    }
}

/// The opaque cursor of a position: hex of "scope NUL key" (stored text holds no NUL).
pub(crate) fn encode_cursor((scope, key): &Position) -> String {
    format!("{scope}\0{key}")
        .bytes()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The position a cursor stands for; `None` if it is not one Blox made.
pub(crate) fn decode_cursor(cursor: &str) -> Option<Position> {
    if !cursor.len().is_multiple_of(2) || !cursor.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (scope, key) = text.split_once('\0')?;
    Some((scope.to_owned(), key.to_owned()))
}

/// The error for a cursor Blox did not hand out.
pub(crate) fn invalid_cursor(store: &str) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "DataStoreService: InvalidExclusiveStartKey: The provided exclusive start key is not valid. API: ListKeysAsync, Data Store: {store}"
    ))
}

/// `DataStoreKeyPages`.
pub struct KeyPages {
    context: Rc<DataStoreContext>,
    query: KeyQuery,
    page: RefCell<(Vec<String>, Option<Position>)>,
}

impl KeyPages {
    pub(crate) fn new(
        context: Rc<DataStoreContext>,
        query: KeyQuery,
        page: (Vec<String>, Option<Position>),
    ) -> Self {
        Self {
            context,
            query,
            page: RefCell::new(page),
        }
    }
}

impl UserData for KeyPages {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("ClassName", "DataStoreKeyPages");
        fields.add_field("Name", "DataStoreKeyPages");
        fields.add_field_method_get("IsFinished", |_, pages| Ok(pages.page.borrow().1.is_none()));
        fields.add_field_method_get("Cursor", |_, pages| {
            Ok(pages
                .page
                .borrow()
                .1
                .as_ref()
                .map(encode_cursor)
                .unwrap_or_default())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("GetCurrentPage", |lua, pages, ()| {
            let list = lua.create_table()?;
            for (index, name) in pages.page.borrow().0.iter().enumerate() {
                list.raw_set(index + 1, DataStoreKey(name.clone()))?;
            }
            Ok(list)
        });
        methods.add_async_method("AdvanceToNextPageAsync", |_, pages, ()| async move {
            let Some(after) = pages.page.borrow().1.clone() else {
                return Err(mlua::Error::RuntimeError(
                    "No pages to advance to".to_owned(),
                ));
            };
            let next = pages.query.fetch(&pages.context, after).await?;
            *pages.page.borrow_mut() = next;
            Ok(())
        });
        methods.add_method("IsA", |_, _, class: String| {
            Ok(matches!(
                class.as_str(),
                "DataStoreKeyPages" | "Pages" | "Instance"
            ))
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("DataStoreKeyPages"));
    }
}

/// `DataStoreKey`: one item of a `DataStoreKeyPages`.
#[derive(Debug, Clone)]
pub struct DataStoreKey(String);

impl UserData for DataStoreKey {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
        fields.add_field("ClassName", "DataStoreKey");
        fields.add_field("Name", "DataStoreKey");
        fields.add_field_method_get("KeyName", |_, key| Ok(key.0.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("DataStoreKey"));
    }
}

/// Validates a `pageSize` argument; 0 means the default.
pub(crate) fn page_size(value: Option<f64>) -> Result<i64, DataStoreError> {
    match value {
        None | Some(0.0) => Ok(DEFAULT_KEY_PAGE_SIZE),
        Some(size) if size > 0.0 && size.fract() == 0.0 && size <= 10_000.0 => Ok(size as i64),
        Some(_) => Err(DataStoreError::PageSizeOutOfRange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let position = ("global".to_owned(), "player_é".to_owned());
        assert_eq!(decode_cursor(&encode_cursor(&position)), Some(position));
        for garbage in ["", "zz", "abc", "676c6f62616c", "ff00"] {
            assert_eq!(decode_cursor(garbage), None, "{garbage}");
        }
    }
}

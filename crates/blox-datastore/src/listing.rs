//! Listings and their pages: `ListKeysAsync` (`DataStoreKeyPages` of `DataStoreKey`),
//! `ListDataStoresAsync` (`DataStoreListingPages` of `DataStoreInfo`) and `ListVersionsAsync`
//! (`DataStoreVersionPages` of `DataStoreObjectVersionInfo`).
//!
//! Pages use keyset pagination over the primary key: each page starts after the previous
//! page's last (scope, key), or last store name, so keys written meanwhile never shift a page
//! and a key page costs the same at key 10 as at key 1,000,000. The cursor handed to scripts
//! encodes that position; it is opaque to them, as on Roblox. One generic [`Pages`] object
//! serves every listing through the [`PageSource`] it is given.

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{MetaMethod, UserData, UserDataFields, UserDataMethods};

use crate::DataStoreError;
use crate::backend::{
    KeyListing, ScopeRange, StoreListing, VersionListing, prefix_end, stored_text,
    unescape_stored_text,
};
use crate::budget::Family;
use crate::service::{DataStoreContext, version_string};

/// Keys per page when the script passes 0 (or nothing), as Roblox's backend does.
pub const DEFAULT_KEY_PAGE_SIZE: i64 = 50;

/// Stores per page when the script passes 0 (or nothing), as Roblox's backend does.
pub const DEFAULT_STORE_PAGE_SIZE: i64 = 32;

/// Versions per page when the script passes 0 (or nothing), as Roblox's backend does.
pub const DEFAULT_VERSION_PAGE_SIZE: i64 = 1024;

/// Where the next page starts, in stored form: after this (scope, key), or for store
/// listings after the store named by the second part.
pub(crate) type Position = (String, String);

/// One page of items and where the next page starts (`None` on the last page).
pub(crate) type Page<T> = (Vec<T>, Option<Position>);

/// What a [`Pages`] object lists.
pub(crate) trait PageSource: 'static {
    /// One item of a page.
    type Item: mlua::IntoLua + Clone + 'static;
    /// The Roblox class of the pages object.
    const CLASS: &'static str;
    /// The budget every page, the first and each next one, is spent from.
    const FAMILY: Family;
    /// The method whose budget and errors the pages carry.
    const API: &'static str;
    /// The data store named in throttle errors.
    fn store_name(&self) -> &str;
    /// The page after `after`.
    async fn fetch(
        &self,
        lua: &mlua::Lua,
        context: &DataStoreContext,
        after: Position,
    ) -> mlua::Result<Page<Self::Item>>;
}

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
        let stored_prefix = stored_text(prefix);
        let (scope, key_prefix) = match (scope, prefix.split_once('/')) {
            (Some(scope), _) => (scope.to_owned(), stored_prefix),
            (None, Some((scope, key_prefix))) => (stored_text(scope), stored_text(key_prefix)),
            (None, None) => {
                listing.scopes = ScopeRange::Between {
                    to: prefix_end(&stored_prefix),
                    from: stored_prefix,
                };
                return listing;
            }
        };
        listing.scopes = ScopeRange::Exactly(scope);
        listing.key_to = prefix_end(&key_prefix);
        listing.key_from = key_prefix;
        listing
    }
}

impl PageSource for KeyQuery {
    type Item = DataStoreKey;
    const CLASS: &'static str = "DataStoreKeyPages";
    const FAMILY: Family = Family::StandardList;
    const API: &'static str = "ListKeysAsync";

    fn store_name(&self) -> &str {
        &self.store_name
    }

    async fn fetch(
        &self,
        lua: &mlua::Lua,
        context: &DataStoreContext,
        after: Position,
    ) -> mlua::Result<Page<DataStoreKey>> {
        let mut listing = self.listing.clone();
        listing.after = after;
        listing.limit = self.page_size + 1;
        let mut rows = context
            .run(
                lua,
                Self::API,
                &self.store_name,
                move |backend| async move { Ok(backend.list_keys(&listing).await?) },
            )
            .await?;
        let next = keep_page(&mut rows, self.page_size).cloned();
        let names = rows
            .iter()
            .map(|(scope, key)| {
                let key = unescape_stored_text(key);
                DataStoreKey(if self.qualified {
                    format!("{}/{key}", unescape_stored_text(scope))
                } else {
                    key
                })
            })
            .collect();
        Ok((names, next))
    }
}

/// What a `ListDataStoresAsync` call lists, independent of the page.
#[derive(Debug, Clone)]
pub(crate) struct StoreQuery {
    pub(crate) listing: StoreListing,
    pub(crate) page_size: i64,
}

impl StoreQuery {
    /// The listing of the stores whose names start with `prefix`.
    pub(crate) fn listing_for(mut listing: StoreListing, prefix: &str) -> StoreListing {
        let prefix = stored_text(prefix);
        listing.name_to = prefix_end(&prefix);
        listing.name_from = prefix;
        listing
    }
}

impl PageSource for StoreQuery {
    type Item = DataStoreInfo;
    const CLASS: &'static str = "DataStoreListingPages";
    const FAMILY: Family = Family::StandardList;
    const API: &'static str = "ListDataStoresAsync";

    fn store_name(&self) -> &str {
        ""
    }

    async fn fetch(
        &self,
        lua: &mlua::Lua,
        context: &DataStoreContext,
        after: Position,
    ) -> mlua::Result<Page<DataStoreInfo>> {
        let mut listing = self.listing.clone();
        listing.after = after.1;
        listing.limit = self.page_size + 1;
        let mut stores = context
            .run(lua, Self::API, "", move |backend| async move {
                Ok(backend.list_stores(&listing).await?)
            })
            .await?;
        let next =
            keep_page(&mut stores, self.page_size).map(|store| (String::new(), store.name.clone()));
        let infos = stores
            .into_iter()
            .map(|store| DataStoreInfo {
                name: unescape_stored_text(&store.name),
                created_ms: store.created_ms,
                updated_ms: store.updated_ms,
            })
            .collect();
        Ok((infos, next))
    }
}

/// What a `ListVersionsAsync` call lists, independent of the page.
#[derive(Debug, Clone)]
pub(crate) struct VersionQuery {
    pub(crate) listing: VersionListing,
    pub(crate) page_size: i64,
    pub(crate) store_name: String,
}

impl PageSource for VersionQuery {
    type Item = DataStoreObjectVersionInfo;
    const CLASS: &'static str = "DataStoreVersionPages";
    const FAMILY: Family = Family::StandardList;
    const API: &'static str = "ListVersionsAsync";

    fn store_name(&self) -> &str {
        &self.store_name
    }

    async fn fetch(
        &self,
        lua: &mlua::Lua,
        context: &DataStoreContext,
        after: Position,
    ) -> mlua::Result<Page<DataStoreObjectVersionInfo>> {
        let mut listing = self.listing.clone();
        listing.after_seq = after.1.parse().ok();
        listing.limit = self.page_size + 1;
        let mut versions = context
            .run(
                lua,
                Self::API,
                &self.store_name,
                move |backend| async move { Ok(backend.list_versions(&listing).await?) },
            )
            .await?;
        let next = keep_page(&mut versions, self.page_size)
            .map(|last| (String::new(), last.version.seq.to_string()));
        let infos = versions
            .iter()
            .map(|summary| DataStoreObjectVersionInfo {
                version: version_string(&summary.version),
                created_ms: summary.version.updated_ms,
                deleted: summary.deleted,
            })
            .collect();
        Ok((infos, next))
    }
}

/// Cuts `rows` (fetched with one row more than a page) down to one page, and returns the
/// page's last row when more rows follow it: where the next page starts.
pub(crate) fn keep_page<T>(rows: &mut Vec<T>, page_size: i64) -> Option<&T> {
    let more = rows.len() as i64 > page_size;
    rows.truncate(page_size as usize);
    rows.last().filter(|_| more)
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
pub(crate) fn invalid_cursor(api: &str, store: &str) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "DataStoreService: InvalidExclusiveStartKey: The provided exclusive start key is not valid. API: {api}, Data Store: {store}"
    ))
}

/// A pages object (`DataStoreKeyPages`, `DataStoreListingPages`) over any [`PageSource`].
pub(crate) struct Pages<S: PageSource> {
    context: Rc<DataStoreContext>,
    source: S,
    page: RefCell<Page<S::Item>>,
}

impl<S: PageSource> Pages<S> {
    /// Fetches the first page (after `after`) and wraps it.
    pub(crate) async fn first(
        lua: &mlua::Lua,
        context: Rc<DataStoreContext>,
        source: S,
        after: Position,
    ) -> mlua::Result<Self> {
        context
            .budgets
            .acquire(lua, S::FAMILY, 1, S::API, source.store_name(), "")
            .await?;
        let page = source.fetch(lua, &context, after).await?;
        Ok(Self {
            context,
            source,
            page: RefCell::new(page),
        })
    }
}

impl<S: PageSource> UserData for Pages<S> {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, S::CLASS);
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
            lua.create_sequence_from(pages.page.borrow().0.iter().cloned())
        });
        methods.add_async_method("AdvanceToNextPageAsync", |lua, pages, ()| {
            crate::service::yielding(lua, |lua| async move {
                let Some(after) = pages.page.borrow().1.clone() else {
                    return Err(mlua::Error::RuntimeError(
                        "No pages to advance to".to_owned(),
                    ));
                };
                let store = pages.source.store_name().to_owned();
                pages
                    .context
                    .budgets
                    .acquire(&lua, S::FAMILY, 1, S::API, &store, "")
                    .await?;
                let next = pages.source.fetch(&lua, &pages.context, after).await?;
                *pages.page.borrow_mut() = next;
                Ok(())
            })
        });
        methods.add_method("IsA", |_, _, class: String| {
            Ok(class == S::CLASS || class == "Pages" || class == "Instance")
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok(S::CLASS));
    }
}

/// `DataStoreKey`: one item of a `DataStoreKeyPages`.
#[derive(Debug, Clone)]
pub struct DataStoreKey(String);

impl UserData for DataStoreKey {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreKey");
        fields.add_field_method_get("KeyName", |_, key| Ok(key.0.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("DataStoreKey"));
    }
}

/// `DataStoreInfo`: one item of a `DataStoreListingPages`.
#[derive(Debug, Clone)]
pub struct DataStoreInfo {
    name: String,
    created_ms: i64,
    updated_ms: i64,
}

impl UserData for DataStoreInfo {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreInfo");
        fields.add_field_method_get("DataStoreName", |_, info| Ok(info.name.clone()));
        fields.add_field_method_get("CreatedTime", |_, info| Ok(info.created_ms));
        fields.add_field_method_get("UpdatedTime", |_, info| Ok(info.updated_ms));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("DataStoreInfo"));
    }
}

/// `DataStoreObjectVersionInfo`: one item of a `DataStoreVersionPages`.
#[derive(Debug, Clone)]
pub struct DataStoreObjectVersionInfo {
    version: String,
    created_ms: i64,
    deleted: bool,
}

impl UserData for DataStoreObjectVersionInfo {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        instance_fields!(fields, "DataStoreObjectVersionInfo");
        fields.add_field_method_get("Version", |_, info| Ok(info.version.clone()));
        fields.add_field_method_get("CreatedTime", |_, info| Ok(info.created_ms));
        fields.add_field_method_get("IsDeleted", |_, info| Ok(info.deleted));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| {
            Ok("DataStoreObjectVersionInfo")
        });
    }
}

/// Validates a `pageSize` argument; 0 means `default`.
pub(crate) fn page_size(value: Option<f64>, default: i64) -> Result<i64, DataStoreError> {
    match value {
        None | Some(0.0) => Ok(default),
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

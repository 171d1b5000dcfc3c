//! The errors of the DataStore layer, worded exactly as Roblox words them.
//!
//! Scripts match these messages with `string.find` (libraries look for "502", "403", "not
//! valid" and the numeric codes), so each variant's text is part of the API. They reach Luau as
//! plain strings: see `blox_scheduler`'s pcall adapter.

/// An error a DataStore call raises in the calling script.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataStoreError {
    /// The key is the empty string.
    #[error("101: Key name can't be empty.")]
    KeyNameEmpty,
    /// The key is longer than 50 bytes.
    #[error("102: Key name exceeds the 50 character limit.")]
    KeyNameLimit,
    /// An UpdateAsync transform returned a value of a type that cannot be stored.
    #[error("103: {0} is not allowed in DataStore.")]
    ValueNotAllowed(String),
    /// The value (or a value nested in it) cannot be serialized; names the offending type or
    /// the containing `Array`/`Dictionary`.
    #[error(
        "104: Cannot store {0} in data store. Data stores can only accept valid UTF-8 characters."
    )]
    CantStoreValue(String),
    /// The serialized value is longer than 4,194,304 characters.
    #[error("105: Serialized value exceeds 4MB limit.")]
    ValueTooLarge,
    /// Metadata is over one of its limits (key 50, value 250, whole 300).
    #[error("511: Metadata attribute size exceeds {0} bytes limit.")]
    AttributeSizeTooLarge(usize),
    /// More than four user ids.
    #[error("512: UserID size exceeds limit of 4.")]
    UserIdLimitExceeded,
    /// The user ids are not an array of numbers.
    #[error("513: Attribute userId format is invalid.")]
    UserIdFormat,
    /// The metadata is not a dictionary.
    #[error("513: Attribute metadata format is invalid.")]
    MetadataFormat,
    /// IncrementAsync on a key whose value is not an integer.
    #[error(
        "502: API Services rejected request with error. Error code: 24 Reason: Key value is not numeric."
    )]
    NotNumeric,
    /// A required argument is missing or nil.
    #[error("Argument {0} missing or nil")]
    ArgumentMissing(usize),
    /// An argument has a type the parameter cannot take.
    #[error("Unable to cast {from} to {to}")]
    Cast {
        /// The Luau type that was passed.
        from: String,
        /// The parameter's type.
        to: &'static str,
    },
    /// `GetDataStore` was given an empty name.
    #[error("DataStore name can't be empty string")]
    NameEmpty,
    /// `GetDataStore` was given a name longer than 50 bytes.
    #[error("DataStore name is too long")]
    NameTooLong,
    /// `GetDataStore` was given an empty scope.
    #[error("DataStore scope can't be empty string")]
    ScopeEmpty,
    /// `GetDataStore` was given a scope longer than 50 bytes.
    #[error("DataStore scope is too long")]
    ScopeTooLong,
    /// `AllScopes` was set together with a non-empty scope.
    #[error("DataStore scope must be empty when AllScopes is true")]
    ScopeWithAllScopes,
    /// Under `AllScopes`, a key without its `scope/` prefix.
    #[error("102: Key name must be qualified with a scope (\"scope/key\") when AllScopes is true.")]
    KeyNotScoped,
    /// A listing's `pageSize` is negative, fractional or too large.
    #[error("106: PageSize must be within a predefined range.")]
    PageSizeOutOfRange,
    /// An UpdateAsync transform tried to yield.
    #[error("UpdateAsync transform function cannot yield")]
    TransformYielded,
    /// The storage backend failed; the details are logged, scripts see Roblox's wording.
    #[error(
        "DataStoreService: InternalServerError: An internal server error occurred. API: {api}, Data Store: {store}"
    )]
    Internal {
        /// The method that failed.
        api: &'static str,
        /// The data store's name.
        store: String,
    },
    /// A version argument that is not a version string of this key's shape.
    #[error(
        "DataStoreService: InvalidVersion: The provided version is not valid. API: {api}, Data Store: {store}"
    )]
    InvalidVersion {
        /// The method called.
        api: &'static str,
        /// The data store's name.
        store: String,
    },
    /// GetVersionAtTimeAsync's timestamp is not positive or is over ten minutes ahead.
    #[error(
        "DataStoreService: InvalidTimestamp: Timestamp must be positive and not more than ten minutes in the future. API: GetVersionAtTimeAsync, Data Store: {store}"
    )]
    InvalidTimestamp {
        /// The data store's name.
        store: String,
    },
    /// An ordered store was given a value that is not an integer (exact in a Luau number).
    #[error("103: {0} is not allowed in data stores.")]
    OrderedValueNotAllowed(String),
    /// GetSortedAsync's minValue or maxValue is not an integer.
    #[error("106: MaxValue and MinValue must be integers.")]
    MinMaxNotIntegers,
    /// GetSortedAsync's maxValue is below its minValue.
    #[error("107: MaxValue must be greater than or equal to MinValue.")]
    MinMaxOrder,
    /// BatchGetAsync was given no keys or more than its limit.
    #[error("BatchGetAsync takes between 1 and {0} keys.")]
    BatchSize(usize),
    /// BatchGetAsync called on a standard DataStore, which does not support it.
    #[error(
        "DataStoreService: BatchGetAsync is only supported on OrderedDataStore. API: BatchGetAsync, Data Store: {store}"
    )]
    BatchGetOnStandard {
        /// The data store's name.
        store: String,
    },
    /// A request over its family's budget whose queue is full.
    #[error(
        "DataStoreService: {family}GameServerThrottled: {family} request was throttled by game server limits or the request queue was full. API: {api}, Data Store: {store}"
    )]
    GameServerThrottled {
        /// The request family, e.g. `StandardRead`.
        family: &'static str,
        /// The method called.
        api: &'static str,
        /// The data store's name.
        store: String,
    },
    /// `SetRateLimitForRequestType` with `UpdateAsync` or `OnUpdate`, whose limits are fixed.
    #[error("SetRateLimitForRequestType does not support this request type")]
    RateLimitNotConfigurable,
    /// `SetRateLimitForRequestType` with a limit outside the range for its request type.
    #[error("SetRateLimitForRequestType: {parameter} must be an integer between 0 and {max}")]
    RateLimitOutOfRange {
        /// `baseLimit` or `perPlayerLimit`.
        parameter: &'static str,
        /// The largest value allowed.
        max: u32,
    },
    /// Stored text that Blox did not write and cannot read.
    #[error("501: Can't parse response, data may be corrupted. ({0})")]
    Corrupt(String),
    /// Luau itself failed while a value was read for storing (it ran out of memory); the text
    /// is Luau's own.
    #[error("{0}")]
    Luau(String),
}

impl From<DataStoreError> for mlua::Error {
    fn from(error: DataStoreError) -> Self {
        mlua::Error::RuntimeError(error.to_string())
    }
}

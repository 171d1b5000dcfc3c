//! `DateTime`: Roblox's time value, as host userdata (`typeof` gives "DateTime").

use std::time::{SystemTime, UNIX_EPOCH};

use mlua::{Lua, MetaMethod, UserData, UserDataFields, UserDataMethods};

/// A point in time, in Unix milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct DateTime {
    unix_millis: i64,
}

impl UserData for DateTime {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "DateTime");
        fields.add_field_method_get("UnixTimestampMillis", |_, time| Ok(time.unix_millis));
        fields.add_field_method_get("UnixTimestamp", |_, time| {
            Ok(time.unix_millis.div_euclid(1000))
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("ToIsoDate", |_, time, ()| Ok(iso_date(time.unix_millis)));
        methods.add_meta_method(MetaMethod::ToString, |_, time, ()| {
            Ok(iso_date(time.unix_millis))
        });
        methods.add_meta_method(
            MetaMethod::Eq,
            |_, time, other: mlua::UserDataRef<DateTime>| Ok(time.unix_millis == other.unix_millis),
        );
    }
}

/// Formats Unix milliseconds as ISO 8601 in UTC, the way `DateTime:ToIsoDate` does.
fn iso_date(unix_millis: i64) -> String {
    let seconds = unix_millis.div_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Installs the `DateTime` global.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let date_time = lua.create_table()?;
    date_time.set(
        "now",
        lua.create_function(|_, ()| {
            let unix_millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as i64);
            Ok(DateTime { unix_millis })
        })?,
    )?;
    date_time.set(
        "fromUnixTimestampMillis",
        lua.create_function(|_, unix_millis: f64| {
            Ok(DateTime {
                unix_millis: unix_millis as i64,
            })
        })?,
    )?;
    date_time.set(
        "fromUnixTimestamp",
        lua.create_function(|_, unix_seconds: f64| {
            Ok(DateTime {
                unix_millis: (unix_seconds * 1000.0) as i64,
            })
        })?,
    )?;
    date_time.set_readonly(true);
    lua.globals().set("DateTime", date_time)
}

#[cfg(test)]
mod tests {
    use super::iso_date;

    #[test]
    fn iso_dates_match_known_instants() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_date(1_643_844_606_538), "2022-02-02T23:30:06Z");
        assert_eq!(iso_date(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}

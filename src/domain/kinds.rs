//! Closed vocabularies stored as text: the [`string_enum!`] macro, which gives each one its
//! names, serde and PostgreSQL encodings from a single table, and the event's own kinds.
//!
//! Reads nothing, writes nothing. Guarantees: a name in JSON, a subject or a column is the
//! same `snake_case` text everywhere; an unknown name is an error when it is read (from JSON
//! or from PostgreSQL), never a silent default.

/// Declares an enum whose values travel as fixed snake_case names: `as_str`, `parse`, `ALL`,
/// `Display`, serde, and sqlx text encoding (unknown stored text fails to decode).
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The snake_case name used in JSON, subjects and the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the snake_case name; `None` for anything else.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }

            /// The accepted names, for error messages.
            pub fn expected() -> String {
                [$($text),+].join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
                $name::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!("unknown {} {:?}; expected one of: {}",
                        stringify!($name), text, $name::expected()))
                })
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                $name::parse(text).ok_or_else(|| format!("unknown {} {text:?} in the database", stringify!($name)).into())
            }
        }
    };
}

pub(crate) use string_enum;

string_enum!(
    /// Where an event comes from.
    EventSource {
        Frontend => "frontend",
        Backend => "backend",
        System => "system",
        IotDevice => "iot_device",
        ExternalApi => "external_api",
        Scheduled => "scheduled",
    }
);

string_enum!(
    /// What kind of thing happened.
    EventCategory {
        UserAction => "user_action",
        PageView => "page_view",
        FormSubmit => "form_submit",
        Click => "click",
        UserLifecycle => "user_lifecycle",
        Payment => "payment",
        Order => "order",
        Task => "task",
        System => "system",
        Security => "security",
        Performance => "performance",
        Error => "error",
        Device => "device",
        DeviceStatus => "device_status",
        Telemetry => "telemetry",
        Command => "command",
        Alert => "alert",
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn names_round_trip_through_json() {
        for source in EventSource::ALL {
            assert_eq!(EventSource::parse(source.as_str()), Some(*source));
            let json = serde_json::to_value(source).unwrap();
            assert_eq!(json, Value::String(source.as_str().to_owned()));
            assert_eq!(serde_json::from_value::<EventSource>(json).unwrap(), *source);
        }
        for category in EventCategory::ALL {
            assert_eq!(EventCategory::parse(category.as_str()), Some(*category));
        }
        assert_eq!(EventSource::parse("Backend"), None);
        let unknown = serde_json::from_value::<EventSource>(Value::String("mars".into())).unwrap_err();
        assert!(unknown.to_string().contains("expected one of: frontend"), "{unknown}");
    }
}

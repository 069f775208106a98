//! Typed ids, so that a batch id can never be passed where an agency id is expected.

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$name> for sea_orm::Value {
            fn from(id: $name) -> Self {
                id.0.into()
            }
        }
    };
}

id_type!(
    /// A tenant: every business row carries one.
    AgencyId
);
id_type!(
    /// A CRM user (the acting user of a request or batch).
    UserId
);
id_type!(
    /// A bulk batch (`bulk_batches.id`).
    BatchId
);

//! The field mappings of the CRM's rules, as data, and pure functions that turn that data
//! into SQL.
//!
//! The lists below are the single source of truth for which columns a bulk create copies
//! from an Individual to its new Sales Record (create rule 4) and which a conversion
//! transfers back (convert rule 4). The worker's statements, the benchmark's set-based
//! reference statements and the tests are all generated from them, so a column cannot be
//! copied by one and forgotten by another. The data never leaves the database: records are
//! copied by set-based `INSERT … SELECT` / `UPDATE … FROM`, so no name, SSN or date of
//! birth passes through a bulkops process.

/// One column copied from a source table to a target table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldCopy {
    /// Column of the source row.
    pub from: &'static str,
    /// Column of the target row.
    pub to: &'static str,
}

const fn same(name: &'static str) -> FieldCopy {
    FieldCopy {
        from: name,
        to: name,
    }
}

const fn renamed(from: &'static str, to: &'static str) -> FieldCopy {
    FieldCopy { from, to }
}

/// Create rule 4: Individual → new Sales Record. Nothing else is copied.
pub const CREATE_FIELDS: &[FieldCopy] = &[
    same("first_name"),
    same("middle_name"),
    same("last_name"),
    same("nickname"),
    same("title"),
    same("status"),
    same("secondary_email"),
    same("cell_phone"),
    renamed("home_phone", "phone"),
    same("address_type"),
    same("address_line1"),
    same("city"),
    same("county"),
    same("zip"),
    same("state"),
    same("gender"),
    renamed("dob", "birth_date"),
    same("lead_source"),
    same("medicare_beneficiary_id"),
    same("medicare_part_a_effective_date"),
    same("medicare_part_b_effective_date"),
    same("ssn"),
    same("drivers_license_number"),
    same("smoker_status"),
];

/// Convert rule 4: Sales Record → Individual (new, or merged into).
pub const CONVERT_FIELDS: &[FieldCopy] = &[
    same("first_name"),
    same("middle_name"),
    same("last_name"),
    same("nickname"),
    same("title"),
    same("status"),
    renamed("birth_date", "dob"),
    same("secondary_email"),
    renamed("phone", "home_phone"),
    same("cell_phone"),
    same("medicare_beneficiary_id"),
    same("medicare_part_a_effective_date"),
    same("medicare_part_b_effective_date"),
    same("ssn"),
    same("gender"),
    same("smoker_status"),
    same("lead_source"),
    same("lead_date"),
    same("drivers_license_number"),
    same("address_type"),
    same("address_line1"),
    same("city"),
    same("state"),
    same("zip"),
    same("county"),
];

/// The Individual's agent columns, filled from the first three Linked Agents (convert rule 5).
pub const AGENT_COLUMNS: [&str; 3] = [
    "servicing_agent_id",
    "additional_agent_1_id",
    "additional_agent_2_id",
];

/// The twelve custom field types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CustomFieldType {
    /// Single-line text.
    Text,
    /// Multi-line text.
    Textarea,
    /// A date.
    Date,
    /// One of a list of options.
    Dropdown,
    /// An e-mail address.
    Email,
    /// A phone number.
    Phone,
    /// A URL.
    Url,
    /// A number.
    Number,
    /// An amount of money.
    Currency,
    /// A percentage.
    Percent,
    /// A yes/no box.
    Checkbox,
    /// Several boxes.
    CheckboxList,
}

impl CustomFieldType {
    /// All twelve, in the contract's order.
    pub const ALL: [CustomFieldType; 12] = [
        Self::Text,
        Self::Textarea,
        Self::Date,
        Self::Dropdown,
        Self::Email,
        Self::Phone,
        Self::Url,
        Self::Number,
        Self::Currency,
        Self::Percent,
        Self::Checkbox,
        Self::CheckboxList,
    ];

    /// The stored name (`custom_field_definitions.field_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Textarea => "textarea",
            Self::Date => "date",
            Self::Dropdown => "dropdown",
            Self::Email => "email",
            Self::Phone => "phone",
            Self::Url => "url",
            Self::Number => "number",
            Self::Currency => "currency",
            Self::Percent => "percent",
            Self::Checkbox => "checkbox",
            Self::CheckboxList => "checkbox_list",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Create rule 6: whether a bulk create copies a custom field of this type. Number,
    /// currency, percent, checkbox and checkbox list values are not copied.
    pub fn copied_on_create(self) -> bool {
        !matches!(
            self,
            Self::Number | Self::Currency | Self::Percent | Self::Checkbox | Self::CheckboxList
        )
    }
}

/// The type names a bulk create copies, as a SQL array parameter.
pub fn create_copied_types() -> Vec<String> {
    CustomFieldType::ALL
        .into_iter()
        .filter(|t| t.copied_on_create())
        .map(|t| t.as_str().to_owned())
        .collect()
}

/// Target column list and source expressions of an `INSERT … SELECT` copying `fields`
/// from the row aliased `source`.
pub fn insert_lists(fields: &[FieldCopy], source: &str) -> (String, String) {
    let targets = fields.iter().map(|f| f.to).collect::<Vec<_>>().join(", ");
    let exprs = fields
        .iter()
        .map(|f| format!("{source}.{}", f.from))
        .collect::<Vec<_>>()
        .join(", ");
    (targets, exprs)
}

/// `SET` list of a merge (convert rule 3): a non-NULL source value overwrites, a NULL
/// never erases. Target columns are unqualified, as `UPDATE … SET` requires.
pub fn merge_set_list(fields: &[FieldCopy], source: &str, target: &str) -> String {
    fields
        .iter()
        .map(|f| {
            format!(
                "{to} = COALESCE({source}.{from}, {target}.{to})",
                to = f.to,
                from = f.from
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows `(field, old_value, new_value)` of a `VALUES` list, one per transferred field, for
/// recording what a merge changes: a row is kept where the new value is not NULL and
/// differs from the old one (filtering is the caller's `WHERE`).
pub fn change_rows(fields: &[FieldCopy], source: &str, target: &str) -> String {
    fields
        .iter()
        .map(|f| {
            format!(
                "('{to}', {target}.{to}::text, {source}.{from}::text)",
                to = f.to,
                from = f.from
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_copies_exactly_rule_4() {
        let pairs: Vec<(&str, &str)> = CREATE_FIELDS.iter().map(|f| (f.from, f.to)).collect();
        assert_eq!(pairs.len(), 24);
        assert!(pairs.contains(&("home_phone", "phone")));
        assert!(pairs.contains(&("dob", "birth_date")));
        for absent in [
            "lead_date",
            "id",
            "agency_id",
            "created_at",
            "servicing_agent_id",
            "home_phone",
        ] {
            assert!(
                !CREATE_FIELDS.iter().any(|f| f.to == absent),
                "{absent} must not be copied"
            );
        }
        let mut targets: Vec<&str> = CREATE_FIELDS.iter().map(|f| f.to).collect();
        targets.sort_unstable();
        targets.dedup();
        assert_eq!(
            targets.len(),
            CREATE_FIELDS.len(),
            "no column written twice"
        );
    }

    #[test]
    fn convert_transfers_exactly_rule_4() {
        let pairs: Vec<(&str, &str)> = CONVERT_FIELDS.iter().map(|f| (f.from, f.to)).collect();
        assert_eq!(pairs.len(), 25);
        assert!(pairs.contains(&("birth_date", "dob")));
        assert!(pairs.contains(&("phone", "home_phone")));
        assert!(pairs.contains(&("lead_date", "lead_date")));
        for absent in ["assigned_user_id", "record_type_id", "individual_id", "id"] {
            assert!(
                !CONVERT_FIELDS.iter().any(|f| f.from == absent),
                "{absent} must not move"
            );
        }
    }

    #[test]
    fn create_skips_numeric_and_checkbox_custom_fields() {
        assert_eq!(
            create_copied_types(),
            vec![
                "text", "textarea", "date", "dropdown", "email", "phone", "url"
            ]
        );
        for t in CustomFieldType::ALL {
            assert_eq!(CustomFieldType::parse(t.as_str()), Some(t));
        }
    }

    #[test]
    fn sql_lists() {
        let fields = &[same("a"), renamed("b", "c")];
        assert_eq!(
            insert_lists(fields, "s"),
            ("a, c".to_owned(), "s.a, s.b".to_owned())
        );
        assert_eq!(
            merge_set_list(fields, "s", "t"),
            "a = COALESCE(s.a, t.a), c = COALESCE(s.b, t.c)"
        );
        assert_eq!(
            change_rows(fields, "s", "t"),
            "('a', t.a::text, s.a::text), ('c', t.c::text, s.b::text)"
        );
    }
}

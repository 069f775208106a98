//! The Individual Advanced Search filter: parsed once into a typed value, then turned into
//! SQL with bind parameters.
//!
//! Semantics (CONTRACT §3): every key optional, `{}` matches every Individual of the
//! agency; keys are AND-ed, values within a list OR-ed by exact match; ranges inclusive,
//! either end optional; `policy` criteria match an Individual with at least one policy
//! satisfying all of them. An empty list or `null` means "no condition" (what a search form
//! sends for an untouched field). `created_at` ranges are calendar days in UTC.
//!
//! Rejections name the field (`filter.individual.dob.from`) and never echo the input.

use chrono::NaiveDate;
use sea_orm::Value;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// Most values in one list.
pub const MAX_LIST_LEN: usize = 1000;
/// Longest value in a list of strings.
pub const MAX_VALUE_LEN: usize = 200;

/// A search filter over Individuals and their policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchFilter {
    /// Conditions on the Individual itself.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "IndividualCriteria::is_empty"
    )]
    pub individual: IndividualCriteria,
    /// Conditions that one of the Individual's policies must satisfy together.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "PolicyCriteria::is_empty"
    )]
    pub policy: PolicyCriteria,
}

/// Conditions on `individuals` columns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IndividualCriteria {
    /// Any of these statuses.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub status: Vec<String>,
    /// Any of these states.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub state: Vec<String>,
    /// Any of these counties.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub county: Vec<String>,
    /// Any of these ZIP codes.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub zip: Vec<String>,
    /// Any of these cities.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub city: Vec<String>,
    /// Any of these genders.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub gender: Vec<String>,
    /// Any of these lead sources.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub lead_source: Vec<String>,
    /// Any of these smoker statuses.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub smoker_status: Vec<String>,
    /// Any of these servicing agents.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub servicing_agent_id: Vec<i64>,
    /// Date of birth within this range.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "DateRange::is_empty"
    )]
    pub dob: DateRange,
    /// Created on a day (UTC) within this range.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "DateRange::is_empty"
    )]
    pub created_at: DateRange,
}

/// Conditions one policy must satisfy together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyCriteria {
    /// Any of these coverage types.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub coverage_type: Vec<String>,
    /// Any of these statuses.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub status: Vec<String>,
    /// Any of these carriers.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub carrier: Vec<String>,
    /// Any of these carrier products.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub carrier_product: Vec<String>,
    /// Effective date within this range.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "DateRange::is_empty"
    )]
    pub effective_date: DateRange,
    /// Renewal date within this range.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "DateRange::is_empty"
    )]
    pub renewal_date: DateRange,
}

/// An inclusive range of dates, either end optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DateRange {
    /// First day included.
    #[serde(
        default,
        deserialize_with = "strict_date",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Date)]
    pub from: Option<NaiveDate>,
    /// Last day included.
    #[serde(
        default,
        deserialize_with = "strict_date",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = Date)]
    pub to: Option<NaiveDate>,
}

/// The message of a date that is not `YYYY-MM-DD` (mapped to the field error's text).
const DATE_ERROR: &str = "not a YYYY-MM-DD date";

/// A date exactly as RFC 3339's `full-date` (OpenAPI's `format: date`) writes it: four
/// digits, two, two, and a day that exists. chrono alone would also take `2026-1-5` or
/// `+12026-01-05`, which the document does not describe.
pub fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

fn strict_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NaiveDate>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => parse_date(&s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(DATE_ERROR)),
    }
}

impl DateRange {
    /// Whether neither end is set.
    pub fn is_empty(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }
}

impl IndividualCriteria {
    /// Whether no condition is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl PolicyCriteria {
    /// Whether no condition is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One rejected field: where, and what is wrong (never the rejected value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `filter.individual.dob.from`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Turns a serde error at a path into a [`FieldError`] whose message does not echo input.
pub fn field_error_from_serde(
    prefix: &str,
    path: &serde_path_to_error::Path,
    msg: &str,
) -> FieldError {
    let mut field = prefix.to_owned();
    let path = path.to_string();
    if path != "." && !path.is_empty() {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(&path);
    }
    // serde_path_to_error's path already ends with an unknown key's name.
    let message = if msg.starts_with("unknown field `") {
        "unknown key".to_owned()
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        match msg.rsplit_once(", expected ") {
            Some((_, expected)) => format!("wrong type: expected {expected}"),
            None => "wrong type".to_owned(),
        }
    } else if msg.starts_with("missing field `") {
        let name = msg
            .trim_start_matches("missing field `")
            .split('`')
            .next()
            .unwrap_or_default();
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(name);
        "is required".to_owned()
    } else if msg == DATE_ERROR
        || msg.contains("input contains invalid characters")
        || msg.contains("premature end of input")
        || msg.contains("input is out of range")
        || msg.contains("trailing input")
        || msg.contains("input is not enough")
        || msg.contains("no possible date")
        || msg.contains("impossible")
    {
        "must be a date formatted YYYY-MM-DD".to_owned()
    } else if msg.contains("out of range") || msg.contains("integer") {
        "number out of range".to_owned()
    } else {
        "invalid value".to_owned()
    };
    FieldError { field, message }
}

impl SearchFilter {
    /// Parses a JSON value as a filter; `prefix` names it in errors (e.g. `filter`).
    ///
    /// # Errors
    /// Every problem found, each naming its field.
    pub fn parse(value: &serde_json::Value, prefix: &str) -> Result<Self, Vec<FieldError>> {
        if !value.is_object() {
            return Err(vec![FieldError::new(
                prefix,
                "wrong type: expected an object",
            )]);
        }
        let filter: SearchFilter = serde_path_to_error::deserialize(value).map_err(|e| {
            let msg = e.inner().to_string();
            vec![field_error_from_serde(prefix, e.path(), &msg)]
        })?;
        filter.validate(prefix)?;
        Ok(filter)
    }

    /// Checks what the types cannot: list sizes, value lengths, ids and range order.
    ///
    /// # Errors
    /// Every problem found, each naming its field.
    pub fn validate(&self, prefix: &str) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let p = |rest: &str| {
            if prefix.is_empty() {
                rest.to_owned()
            } else {
                format!("{prefix}.{rest}")
            }
        };
        let i = &self.individual;
        for (name, list) in [
            ("individual.status", &i.status),
            ("individual.state", &i.state),
            ("individual.county", &i.county),
            ("individual.zip", &i.zip),
            ("individual.city", &i.city),
            ("individual.gender", &i.gender),
            ("individual.lead_source", &i.lead_source),
            ("individual.smoker_status", &i.smoker_status),
            ("policy.coverage_type", &self.policy.coverage_type),
            ("policy.status", &self.policy.status),
            ("policy.carrier", &self.policy.carrier),
            ("policy.carrier_product", &self.policy.carrier_product),
        ] {
            if list.len() > MAX_LIST_LEN {
                errors.push(FieldError::new(
                    p(name),
                    format!("at most {MAX_LIST_LEN} values"),
                ));
            }
            if list.iter().any(|v| v.chars().count() > MAX_VALUE_LEN) {
                errors.push(FieldError::new(
                    p(name),
                    format!("values are at most {MAX_VALUE_LEN} characters"),
                ));
            }
            // PostgreSQL text cannot hold NUL characters.
            if list.iter().any(|v| v.contains('\0')) {
                errors.push(FieldError::new(
                    p(name),
                    "values must not contain NUL characters",
                ));
            }
        }
        if i.servicing_agent_id.len() > MAX_LIST_LEN {
            errors.push(FieldError::new(
                p("individual.servicing_agent_id"),
                format!("at most {MAX_LIST_LEN} values"),
            ));
        }
        if i.servicing_agent_id.iter().any(|id| *id < 1) {
            errors.push(FieldError::new(
                p("individual.servicing_agent_id"),
                "ids are positive integers",
            ));
        }
        for (name, range) in [
            ("individual.dob", &i.dob),
            ("individual.created_at", &i.created_at),
            ("policy.effective_date", &self.policy.effective_date),
            ("policy.renewal_date", &self.policy.renewal_date),
        ] {
            if let (Some(from), Some(to)) = (range.from, range.to)
                && from > to
            {
                errors.push(FieldError::new(p(name), "from must not be after to"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// SQL conditions on the Individual aliased `alias`, AND-ed, for a `WHERE` clause that
    /// already scopes the agency. Parameters are appended to `params` and numbered after
    /// those already there. Returns `TRUE` when the filter is empty.
    pub fn to_sql(&self, alias: &str, params: &mut Vec<Value>) -> String {
        let mut conds: Vec<String> = Vec::new();
        let i = &self.individual;
        for (column, list) in [
            ("status", &i.status),
            ("state", &i.state),
            ("county", &i.county),
            ("zip", &i.zip),
            ("city", &i.city),
            ("gender", &i.gender),
            ("lead_source", &i.lead_source),
            ("smoker_status", &i.smoker_status),
        ] {
            text_in(&mut conds, params, &format!("{alias}.{column}"), list);
        }
        if !i.servicing_agent_id.is_empty() {
            params.push(i.servicing_agent_id.clone().into());
            conds.push(format!(
                "{alias}.servicing_agent_id = ANY(${}::bigint[])",
                params.len()
            ));
        }
        date_range(&mut conds, params, &format!("{alias}.dob"), &i.dob);
        if let Some(from) = i.created_at.from {
            params.push(from.into());
            conds.push(format!(
                "{alias}.created_at >= (${}::date)::timestamp AT TIME ZONE 'UTC'",
                params.len()
            ));
        }
        if let Some(to) = i.created_at.to {
            params.push(to.into());
            conds.push(format!(
                "{alias}.created_at < ((${}::date) + 1)::timestamp AT TIME ZONE 'UTC'",
                params.len()
            ));
        }
        let pol = &self.policy;
        if !pol.is_empty() {
            let mut pconds = vec![
                format!("p.individual_id = {alias}.id"),
                format!("p.agency_id = {alias}.agency_id"),
            ];
            for (column, list) in [
                ("coverage_type", &pol.coverage_type),
                ("status", &pol.status),
                ("carrier", &pol.carrier),
                ("carrier_product", &pol.carrier_product),
            ] {
                text_in(&mut pconds, params, &format!("p.{column}"), list);
            }
            date_range(&mut pconds, params, "p.effective_date", &pol.effective_date);
            date_range(&mut pconds, params, "p.renewal_date", &pol.renewal_date);
            conds.push(format!(
                "EXISTS (SELECT 1 FROM policies p WHERE {})",
                pconds.join(" AND ")
            ));
        }
        if conds.is_empty() {
            "TRUE".to_owned()
        } else {
            conds.join(" AND ")
        }
    }
}

fn text_in(conds: &mut Vec<String>, params: &mut Vec<Value>, column: &str, list: &[String]) {
    if list.is_empty() {
        return;
    }
    params.push(list.to_vec().into());
    conds.push(format!("{column} = ANY(${}::text[])", params.len()));
}

fn date_range(conds: &mut Vec<String>, params: &mut Vec<Value>, column: &str, range: &DateRange) {
    if let Some(from) = range.from {
        params.push(from.into());
        conds.push(format!("{column} >= ${}::date", params.len()));
    }
    if let Some(to) = range.to {
        params.push(to.into());
        conds.push(format!("{column} <= ${}::date", params.len()));
    }
}

/// The exact JSON Schemas (OpenAPI 3.1 components) of the filter: what [`SearchFilter::parse`]
/// accepts, stated in full, so that clients generated from the document build only
/// requests the API takes. Keys: `SearchFilter`, `IndividualCriteria`, `PolicyCriteria`,
/// `DateRange`. One rule is beyond JSON Schema and stated in words: a range's `from` must
/// not be after its `to`.
pub fn json_schemas() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let nullable_ref = |name: &str, description: &str| {
        json!({
            "description": description,
            "oneOf": [{"$ref": format!("#/components/schemas/{name}")}, {"type": "null"}],
        })
    };
    let text_list = |description: &str| {
        json!({
            "description": format!("{description} Exact match, any of them; an empty list or null means no condition."),
            "type": ["array", "null"],
            "maxItems": MAX_LIST_LEN,
            "items": {"type": "string", "maxLength": MAX_VALUE_LEN, "pattern": "^[^\\u0000]*$"},
        })
    };
    let range = |description: &str| nullable_ref("DateRange", description);
    let individual = json!({
        "description": "Conditions on the Individual itself, AND-ed.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "status": text_list("Statuses."),
            "state": text_list("States."),
            "county": text_list("Counties."),
            "zip": text_list("ZIP codes."),
            "city": text_list("Cities."),
            "gender": text_list("Genders."),
            "lead_source": text_list("Lead sources."),
            "smoker_status": text_list("Smoker statuses."),
            "servicing_agent_id": {
                "description": "Servicing agents, any of them; an empty list or null means no condition.",
                "type": ["array", "null"],
                "maxItems": MAX_LIST_LEN,
                "items": {"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX},
            },
            "dob": range("Date of birth within this range."),
            "created_at": range("Created on a day (UTC) within this range."),
        },
    });
    let policy = json!({
        "description": "Conditions one of the Individual's policies must satisfy together, AND-ed.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "coverage_type": text_list("Coverage types."),
            "status": text_list("Policy statuses."),
            "carrier": text_list("Carriers."),
            "carrier_product": text_list("Carrier products."),
            "effective_date": range("Effective date within this range."),
            "renewal_date": range("Renewal date within this range."),
        },
    });
    let end = |description: &str| json!({"description": description, "type": ["string", "null"], "format": "date"});
    let date_range = json!({
        "description": "An inclusive range of dates (YYYY-MM-DD), either end optional or null; from must not be after to (a 400 otherwise).",
        "type": "object",
        "additionalProperties": false,
        "properties": {"from": end("First day included."), "to": end("Last day included.")},
    });
    let filter = json!({
        "description": "A search filter over Individuals and their policies. Every key is optional; {} matches every Individual of the agency.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "individual": nullable_ref("IndividualCriteria", "Conditions on the Individual itself."),
            "policy": nullable_ref("PolicyCriteria", "Conditions that one of the Individual's policies must satisfy together."),
        },
    });
    vec![
        ("SearchFilter", filter),
        ("IndividualCriteria", individual),
        ("PolicyCriteria", policy),
        ("DateRange", date_range),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<SearchFilter, Vec<FieldError>> {
        SearchFilter::parse(&v, "filter")
    }

    #[test]
    fn empty_filter_matches_everything() {
        let f = parse(json!({})).unwrap();
        assert_eq!(f, SearchFilter::default());
        let mut params = Vec::new();
        assert_eq!(f.to_sql("i", &mut params), "TRUE");
        assert!(params.is_empty());
    }

    #[test]
    fn the_contracts_example_parses_and_becomes_sql() {
        let f = parse(json!({
            "individual": {"status": ["Active"], "state": ["TX","OK"], "county": [], "zip": [],
                           "city": [], "gender": [], "lead_source": [], "smoker_status": [],
                           "servicing_agent_id": [12], "dob": {"from": "1950-01-01", "to": "1960-12-31"},
                           "created_at": {"from": "2026-01-01", "to": "2026-06-30"}},
            "policy": {"coverage_type": ["Medicare Supplement"], "status": ["Active"],
                       "carrier": [], "carrier_product": [],
                       "effective_date": {"from": "2026-01-01"}, "renewal_date": {"to": "2027-01-01"}}
        }))
        .unwrap();
        assert_eq!(f.individual.state, vec!["TX", "OK"]);
        let mut params = vec![Value::from(1_i64)];
        let sql = f.to_sql("i", &mut params);
        assert_eq!(
            sql,
            "i.status = ANY($2::text[]) AND i.state = ANY($3::text[]) \
             AND i.servicing_agent_id = ANY($4::bigint[]) \
             AND i.dob >= $5::date AND i.dob <= $6::date \
             AND i.created_at >= ($7::date)::timestamp AT TIME ZONE 'UTC' \
             AND i.created_at < (($8::date) + 1)::timestamp AT TIME ZONE 'UTC' \
             AND EXISTS (SELECT 1 FROM policies p WHERE p.individual_id = i.id \
             AND p.agency_id = i.agency_id AND p.coverage_type = ANY($9::text[]) \
             AND p.status = ANY($10::text[]) AND p.effective_date >= $11::date \
             AND p.renewal_date <= $12::date)"
        );
        assert_eq!(params.len(), 12);
    }

    #[test]
    fn nulls_and_empty_lists_mean_no_condition() {
        let f = parse(json!({"individual": {"state": null, "zip": []}, "policy": null})).unwrap();
        assert_eq!(f, SearchFilter::default());
    }

    #[test]
    fn serialised_form_is_compact_and_round_trips() {
        let f = parse(json!({"individual": {"state": ["TX"]}})).unwrap();
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v, json!({"individual": {"state": ["TX"]}}));
        assert_eq!(parse(v).unwrap(), f);
    }

    #[test]
    fn rejections_name_the_field_and_do_not_echo_input() {
        let cases = [
            (
                json!({"individual": {"shoe_size": [1]}}),
                "filter.individual.shoe_size",
                "unknown key",
            ),
            (json!({"persons": {}}), "filter.persons", "unknown key"),
            (
                json!({"individual": {"state": "TX-SECRET"}}),
                "filter.individual.state",
                "wrong type",
            ),
            (
                json!({"individual": {"dob": {"from": "1950-13-45"}}}),
                "filter.individual.dob.from",
                "YYYY-MM-DD",
            ),
            (
                json!({"individual": {"dob": {"from": "yesterday"}}}),
                "filter.individual.dob.from",
                "YYYY-MM-DD",
            ),
            (
                json!({"policy": {"effective_date": {"after": "2020-01-01"}}}),
                "filter.policy.effective_date.after",
                "unknown key",
            ),
            (
                json!({"individual": {"servicing_agent_id": ["x"]}}),
                "filter.individual.servicing_agent_id[0]",
                "wrong type",
            ),
            (
                json!({"individual": {"dob": {"from": "1960-01-01", "to": "1950-01-01"}}}),
                "filter.individual.dob",
                "after",
            ),
            (
                json!({"individual": {"servicing_agent_id": [0]}}),
                "filter.individual.servicing_agent_id",
                "positive",
            ),
            (json!([1, 2]), "filter", "wrong type"),
        ];
        for (input, field, message) in cases {
            let errs = parse(input.clone()).unwrap_err();
            assert_eq!(errs[0].field, field, "{input}");
            assert!(
                errs[0].message.contains(message),
                "{input}: {}",
                errs[0].message
            );
            assert!(!errs[0].message.contains("SECRET"));
        }
    }

    #[test]
    fn nul_characters_are_refused() {
        let errs = parse(json!({"individual": {"city": ["Aus\u{0}tin"]}})).unwrap_err();
        assert_eq!(errs[0].field, "filter.individual.city");
    }

    #[test]
    fn list_limits() {
        let many: Vec<String> = (0..=MAX_LIST_LEN).map(|n| n.to_string()).collect();
        let errs = parse(json!({"individual": {"zip": many}})).unwrap_err();
        assert_eq!(errs[0].field, "filter.individual.zip");
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let errs = parse(json!({"policy": {"carrier": [long]}})).unwrap_err();
        assert_eq!(errs[0].field, "filter.policy.carrier");
    }

    #[test]
    fn dates_are_exactly_yyyy_mm_dd() {
        assert!(parse_date("2026-01-05").is_some());
        assert!(parse_date("0000-01-01").is_some());
        for bad in [
            "2026-1-5",
            "+12026-01-05",
            "2026-02-30",
            "2026-01-05T00:00:00Z",
            " 2026-01-05",
            "20260105",
        ] {
            assert!(parse_date(bad).is_none(), "{bad}");
            let errs = parse(json!({"individual": {"dob": {"to": bad}}})).unwrap_err();
            assert_eq!(errs[0].field, "filter.individual.dob.to");
            assert!(errs[0].message.contains("YYYY-MM-DD"), "{bad}");
        }
        let errs = parse(json!({"individual": {"dob": {"to": 20260105}}})).unwrap_err();
        assert!(errs[0].message.contains("wrong type"));
        assert_eq!(
            parse(json!({"individual": {"dob": {"from": null, "to": null}}, "policy": {"renewal_date": null}}))
                .unwrap(),
            SearchFilter::default()
        );
    }

    #[test]
    fn the_documented_schema_names_exactly_the_keys_the_parser_knows() {
        let d = || Some(NaiveDate::from_ymd_opt(2026, 1, 1).unwrap());
        let range = DateRange { from: d(), to: d() };
        let one = || vec!["x".to_owned()];
        let full = SearchFilter {
            individual: IndividualCriteria {
                status: one(),
                state: one(),
                county: one(),
                zip: one(),
                city: one(),
                gender: one(),
                lead_source: one(),
                smoker_status: one(),
                servicing_agent_id: vec![1],
                dob: range,
                created_at: range,
            },
            policy: PolicyCriteria {
                coverage_type: one(),
                status: one(),
                carrier: one(),
                carrier_product: one(),
                effective_date: range,
                renewal_date: range,
            },
        };
        let v = serde_json::to_value(&full).unwrap();
        let schemas: std::collections::HashMap<_, _> = json_schemas().into_iter().collect();
        let keys = |o: &serde_json::Value| {
            let mut k: Vec<String> = o.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), keys(&schemas["SearchFilter"]["properties"]));
        assert_eq!(
            keys(&v["individual"]),
            keys(&schemas["IndividualCriteria"]["properties"])
        );
        assert_eq!(
            keys(&v["policy"]),
            keys(&schemas["PolicyCriteria"]["properties"])
        );
        assert_eq!(
            keys(&v["individual"]["dob"]),
            keys(&schemas["DateRange"]["properties"])
        );
        for (name, s) in &schemas {
            assert_eq!(s["additionalProperties"], false, "{name}");
        }
        // The limits are the parser's.
        let zip = &schemas["IndividualCriteria"]["properties"]["zip"];
        assert_eq!(zip["maxItems"], MAX_LIST_LEN);
        assert_eq!(zip["items"]["maxLength"], MAX_VALUE_LEN);
        // Null is accepted wherever the schema says so.
        assert!(parse(json!({"individual": null, "policy": {"carrier": null}})).is_ok());
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z0-9 -]{0,12}".prop_map(serde_json::Value::from),
            Just(json!("2026-01-31")),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            let keys = prop_oneof![
                Just("individual".to_owned()),
                Just("policy".to_owned()),
                Just("state".to_owned()),
                Just("dob".to_owned()),
                Just("from".to_owned()),
                Just("to".to_owned()),
                Just("coverage_type".to_owned()),
                Just("servicing_agent_id".to_owned()),
                "[a-z_]{1,8}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(keys, inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics_and_every_rejection_names_a_field(v in arb_json()) {
            match SearchFilter::parse(&v, "filter") {
                Ok(f) => {
                    let mut params = Vec::new();
                    let sql = f.to_sql("i", &mut params);
                    prop_assert!(!sql.is_empty());
                    // Parameters are only ever referenced by number, never inlined.
                    prop_assert!(!sql.contains('\''.to_string().repeat(2).as_str()));
                }
                Err(errs) => {
                    prop_assert!(!errs.is_empty());
                    for e in errs {
                        prop_assert!(e.field.starts_with("filter"));
                        prop_assert!(!e.message.is_empty());
                    }
                }
            }
        }
    }
}

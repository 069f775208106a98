//! CRM data builders: rows from JSON objects, so a test states exactly the data it needs.

use bulkops_shared::db::stmt;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};

/// Inserts a row whose columns are `fields`' keys; returns its id.
pub async fn insert(db: &DatabaseConnection, table: &str, fields: &Value) -> i64 {
    let obj = fields
        .as_object()
        .unwrap_or_else(|| panic!("{table}: fields must be an object"));
    let cols: Vec<&str> = obj.keys().map(String::as_str).collect();
    let list = cols.join(", ");
    let sql = format!(
        "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_record(NULL::{table}, $1) RETURNING id"
    );
    let row = db
        .query_one_raw(stmt(sql.clone(), [fields.clone().into()]))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: no row"));
    row.try_get("", "id")
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Inserts a row of a table without an `id` column.
pub async fn insert_plain(db: &DatabaseConnection, table: &str, fields: &Value) {
    let obj = fields
        .as_object()
        .unwrap_or_else(|| panic!("{table}: fields must be an object"));
    let list = obj
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_record(NULL::{table}, $1)"
    );
    db.execute_raw(stmt(sql.clone(), [fields.clone().into()]))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A row as JSON, or Null when it does not exist.
pub async fn row(db: &DatabaseConnection, table: &str, id: i64) -> Value {
    let sql = format!("SELECT to_jsonb(t) AS j FROM {table} t WHERE id = $1");
    match db
        .query_one_raw(stmt(sql.clone(), [id.into()]))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        Some(r) => r.try_get("", "j").unwrap_or(Value::Null),
        None => Value::Null,
    }
}

/// Rows of a query (each row's single jsonb column `j`).
pub async fn rows(db: &DatabaseConnection, sql: &str, values: Vec<sea_orm::Value>) -> Vec<Value> {
    db.query_all_raw(stmt(sql, values))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.try_get("", "j").unwrap_or(Value::Null))
        .collect()
}

/// An agency with a fully entitled user, a record type, the usual security groups and
/// policy statuses: what most tests start from.
#[derive(Debug, Clone)]
pub struct World {
    /// The agency.
    pub agency: i64,
    /// An active agency user with every right.
    pub admin: i64,
    /// A record type the admin has full rights on.
    pub record_type: i64,
    /// The group giving edit on Individuals and Sales Enablement.
    pub full_group: i64,
}

impl World {
    /// Builds one.
    pub async fn new(db: &DatabaseConnection, name: &str) -> Self {
        let agency = insert(db, "agencies", &json!({"name": name})).await;
        let admin = user(db, agency, "agency_user").await;
        let full_group = insert(
            db,
            "security_groups",
            &json!({"agency_id": agency, "name": "Admins", "individuals_access": "edit", "sales_enablement_visible": true}),
        )
        .await;
        join(db, admin, full_group).await;
        let record_type = insert(
            db,
            "sales_record_types",
            &json!({"agency_id": agency, "name": "Medicare Lead"}),
        )
        .await;
        permit(db, admin, record_type, true, true, true).await;
        for (name, conv) in [
            ("Active", false),
            ("Pending", false),
            ("Conversion", true),
            ("Written", true),
        ] {
            insert(
                db,
                "policy_statuses",
                &json!({"agency_id": agency, "name": name, "lead_conversion": conv}),
            )
            .await;
        }
        Self {
            agency,
            admin,
            record_type,
            full_group,
        }
    }

    /// The admin's token.
    pub fn token(&self) -> String {
        crate::api::token(self.admin, self.agency)
    }
}

/// A user of `kind`.
pub async fn user(db: &DatabaseConnection, agency: i64, kind: &str) -> i64 {
    insert(
        db,
        "users",
        &json!({"agency_id": agency, "name": "Test User", "kind": kind}),
    )
    .await
}

/// Puts a user in a security group.
pub async fn join(db: &DatabaseConnection, user: i64, group: i64) {
    insert_plain(
        db,
        "user_security_groups",
        &json!({"user_id": user, "security_group_id": group}),
    )
    .await;
}

/// Grants rights on a record type.
pub async fn permit(
    db: &DatabaseConnection,
    user: i64,
    record_type: i64,
    view: bool,
    edit: bool,
    delete: bool,
) {
    insert_plain(
        db,
        "user_sales_permissions",
        &json!({"user_id": user, "record_type_id": record_type, "can_view": view, "can_edit": edit, "can_delete": delete}),
    )
    .await;
}

/// An agent.
pub async fn agent(db: &DatabaseConnection, agency: i64) -> i64 {
    insert(
        db,
        "agents",
        &json!({"agency_id": agency, "name": "Agent", "npn": "123"}),
    )
    .await
}

/// Links an agent to a user at a position.
pub async fn link(db: &DatabaseConnection, user: i64, agent: i64, position: i32) {
    insert_plain(
        db,
        "user_linked_agents",
        &json!({"user_id": user, "agent_id": agent, "position": position}),
    )
    .await;
}

/// A custom field definition.
pub async fn custom_field(
    db: &DatabaseConnection,
    agency: i64,
    entity: &str,
    name: &str,
    field_type: &str,
) -> i64 {
    insert(
        db,
        "custom_field_definitions",
        &json!({"agency_id": agency, "entity": entity, "name": name, "field_type": field_type}),
    )
    .await
}

/// A custom field value.
pub async fn custom_value(db: &DatabaseConnection, definition: i64, record: i64, value: Value) {
    insert_plain(
        db,
        "custom_field_values",
        &json!({"definition_id": definition, "record_id": record, "value": value}),
    )
    .await;
}

/// Custom field values of a record for definitions of `entity`, by field name.
pub async fn custom_values(
    db: &DatabaseConnection,
    entity: &str,
    record: i64,
) -> serde_json::Map<String, Value> {
    let rows = rows(
        db,
        "SELECT jsonb_build_object('name', d.name, 'value', v.value) AS j
           FROM custom_field_values v JOIN custom_field_definitions d ON d.id = v.definition_id
          WHERE d.entity = $1 AND v.record_id = $2",
        vec![entity.into(), record.into()],
    )
    .await;
    rows.into_iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["value"].clone(),
            )
        })
        .collect()
}

//! Authentication: `Authorization: Bearer <JWT>` (HS256, the configured secret; claims
//! `sub` = user id as a string, `agency_id`, `exp`). A missing, malformed, expired or badly
//! signed token, an unknown or inactive user, or a user of another agency is a 401. The
//! extracted [`Caller`] also carries what the user may do, for the 403 checks.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::{AgencyId, UserId};
use bulkops_shared::permissions::{FULL_RIGHTS_SQL, UserAccess};
use jsonwebtoken::{Algorithm, Validation, decode};
use sea_orm::ConnectionTrait;
use serde::Deserialize;

use crate::problem::ApiError;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    agency_id: i64,
    #[allow(dead_code)]
    exp: u64,
}

/// The authenticated acting user.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The user.
    pub user_id: UserId,
    /// The user's (and the token's) agency; every query is scoped to it.
    pub agency_id: AgencyId,
    /// What the user may do.
    pub access: UserAccess,
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.algorithms = vec![Algorithm::HS256];
    v.set_required_spec_claims(&["exp", "sub"]);
    v.validate_exp = true;
    // The CRM and bulkops share clocks closely enough; an expired token is expired.
    v.leeway = 0;
    v
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(ApiError::Unauthorized("missing bearer token"))?
            .to_str()
            .map_err(|_| ApiError::Unauthorized("malformed authorization header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(ApiError::Unauthorized("expected a bearer token"))?
            .trim();
        caller_from_token(state, token).await
    }
}

/// Verifies a CRM token and loads the acting user's rights (the bearer token of the API,
/// or the operator console's session cookie).
///
/// # Errors
/// [`ApiError::Unauthorized`] as the module says; database errors.
pub async fn caller_from_token(state: &AppState, token: &str) -> Result<Caller, ApiError> {
    let claims = decode::<Claims>(token, &state.jwt, &validation())
        .map_err(|_| ApiError::Unauthorized("invalid or expired token"))?
        .claims;
    let user_id: i64 = claims
        .sub
        .parse()
        .map_err(|_| ApiError::Unauthorized("invalid token subject"))?;
    let row = state
            .db
            .query_one_raw(stmt(
                format!("SELECT u.agency_id, u.active, u.kind IN ('agency_user', 'agent_crm_user') AS crm_kind,
                        COALESCE(bool_or(sg.individuals_access IN ('view', 'edit')), false) AS view_ind,
                        COALESCE(bool_or(sg.individuals_access = 'edit'), false) AS edit_ind,
                        COALESCE(bool_or(sg.sales_enablement_visible), false) AS sales_enablement,
                        EXISTS (SELECT 1 FROM user_sales_permissions p
                                  JOIN sales_record_types t ON t.id = p.record_type_id AND t.agency_id = u.agency_id
                                 WHERE p.user_id = u.id AND {FULL_RIGHTS_SQL}) AS full_rights
                   FROM users u
                   LEFT JOIN user_security_groups usg ON usg.user_id = u.id
                   LEFT JOIN security_groups sg ON sg.id = usg.security_group_id AND sg.agency_id = u.agency_id
                  WHERE u.id = $1
                  GROUP BY u.id"),
                [user_id.into()],
            ))
            .await
            .map_err(ApiError::db)?
            .ok_or(ApiError::Unauthorized("unknown user"))?;
    let agency: i64 = row.try_get("", "agency_id").map_err(ApiError::db)?;
    let active: bool = row.try_get("", "active").map_err(ApiError::db)?;
    if agency != claims.agency_id {
        return Err(ApiError::Unauthorized(
            "the user does not belong to the token's agency",
        ));
    }
    if !active {
        return Err(ApiError::Unauthorized("the user is inactive"));
    }
    let get = |col: &str| row.try_get::<bool>("", col).map_err(ApiError::db);
    Ok(Caller {
        user_id: UserId(user_id),
        agency_id: AgencyId(agency),
        access: UserAccess {
            active,
            crm_user_kind: get("crm_kind")?,
            view_individuals: get("view_ind")?,
            edit_individuals: get("edit_ind")?,
            sales_enablement: get("sales_enablement")?,
            full_rights_on_some_record_type: get("full_rights")?,
        },
    })
}

/// Turns a permission rule's answer into a 403.
///
/// # Errors
/// [`ApiError::Forbidden`] with the rule's reason.
pub fn require(rule: Result<(), &'static str>) -> Result<(), ApiError> {
    rule.map_err(|why| ApiError::Forbidden(why.to_owned()))
}

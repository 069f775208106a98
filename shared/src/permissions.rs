//! Who may do what (CONTRACT §2, bulk create rule 1 and convert rule 1), as pure functions
//! over what the database says about a user. The producer loads a [`UserAccess`] per
//! request and asks these; the answers' reasons become the 403's detail.

/// The `role` claim of an operator's token (HS256 with `auth.operator_jwt_secret`): an
/// operator is no CRM user, and sees every agency in the operator console.
pub const OPERATOR_ROLE: &str = "operator";

/// The "full rights on a record type" rule as SQL: a predicate over a row `p` of
/// `user_sales_permissions`. Bulk create needs it on some type of the agency, and a
/// conversion needs it on each record's type (CONTRACT bulk create rule 1, convert rule 1);
/// the authenticator, the accepting transaction and the worker all select with this one
/// fragment, so the rule cannot drift between them.
pub const FULL_RIGHTS_SQL: &str = "(p.can_view AND p.can_edit AND p.can_delete)";

/// What the database says about the acting user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserAccess {
    /// `users.active`.
    pub active: bool,
    /// `users.kind` is 'agency_user' or 'agent_crm_user'.
    pub crm_user_kind: bool,
    /// In a security group with `individuals_access` 'view' or 'edit'.
    pub view_individuals: bool,
    /// In a security group with `individuals_access` 'edit'.
    pub edit_individuals: bool,
    /// In a security group with `sales_enablement_visible`.
    pub sales_enablement: bool,
    /// Has can_view, can_edit and can_delete on at least one Sales Record type of the agency.
    pub full_rights_on_some_record_type: bool,
}

/// Searching Individuals needs view access to them.
///
/// # Errors
/// The reason, for a 403.
pub fn may_search(a: &UserAccess) -> Result<(), &'static str> {
    if !a.active {
        return Err("the user is inactive");
    }
    if !a.view_individuals {
        return Err("the user's security groups do not give access to Individuals");
    }
    Ok(())
}

/// Bulk create rule 1: active, Individuals edit access and Sales Enablement visible (the
/// two may come from different security groups).
///
/// # Errors
/// The reason, for a 403.
pub fn may_bulk_create(a: &UserAccess) -> Result<(), &'static str> {
    if !a.active {
        return Err("the user is inactive");
    }
    if !a.edit_individuals {
        return Err("the user needs a security group with edit access to Individuals");
    }
    if !a.sales_enablement {
        return Err("the user needs a security group with Sales Enablement visible");
    }
    Ok(())
}

/// Convert rule 1: active, an agency or agent CRM user, Sales Enablement visible, and full
/// rights (view, edit, delete) on at least one record type.
///
/// # Errors
/// The reason, for a 403.
pub fn may_convert(a: &UserAccess) -> Result<(), &'static str> {
    if !a.active {
        return Err("the user is inactive");
    }
    if !a.crm_user_kind {
        return Err("only agency users and agent CRM users can convert Sales Records");
    }
    if !a.sales_enablement {
        return Err("the user needs a security group with Sales Enablement visible");
    }
    if !a.full_rights_on_some_record_type {
        return Err(
            "the user needs view, edit and delete rights on at least one Sales Record type",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> UserAccess {
        UserAccess {
            active: true,
            crm_user_kind: true,
            view_individuals: true,
            edit_individuals: true,
            sales_enablement: true,
            full_rights_on_some_record_type: true,
        }
    }

    #[test]
    fn a_fully_entitled_user_may_do_everything() {
        assert!(may_search(&full()).is_ok());
        assert!(may_bulk_create(&full()).is_ok());
        assert!(may_convert(&full()).is_ok());
    }

    #[test]
    fn each_missing_right_forbids() {
        let create_needs = [
            UserAccess {
                active: false,
                ..full()
            },
            UserAccess {
                edit_individuals: false,
                ..full()
            },
            UserAccess {
                sales_enablement: false,
                ..full()
            },
        ];
        for a in create_needs {
            assert!(may_bulk_create(&a).is_err(), "{a:?}");
        }
        assert!(
            may_bulk_create(&UserAccess {
                crm_user_kind: false,
                full_rights_on_some_record_type: false,
                ..full()
            })
            .is_ok()
        );
        let convert_needs = [
            UserAccess {
                active: false,
                ..full()
            },
            UserAccess {
                crm_user_kind: false,
                ..full()
            },
            UserAccess {
                sales_enablement: false,
                ..full()
            },
            UserAccess {
                full_rights_on_some_record_type: false,
                ..full()
            },
        ];
        for a in convert_needs {
            assert!(may_convert(&a).is_err(), "{a:?}");
        }
        assert!(
            may_convert(&UserAccess {
                edit_individuals: false,
                view_individuals: false,
                ..full()
            })
            .is_ok()
        );
        assert!(
            may_search(&UserAccess {
                view_individuals: false,
                ..full()
            })
            .is_err()
        );
    }
}

//! The route table of `/api/v1`, declared once: each operation's path, method, handler
//! and the role it needs (SPEC §4: `viewer` reads, `operator` also starts, cancels,
//! retries, pauses and resumes runs, `admin` does everything). The router and the list
//! of operations (`ROUTES`, which the role tests walk) both come from this one table,
//! and so does the list of handlers whose `#[utoipa::path]` makes the OpenAPI document.

use axum::{Router, handler::Handler, middleware::from_fn_with_state, routing::MethodRouter};
use switchboard_core::model::Role;

use crate::{AppState, middleware::require_role, routes::*};

macro_rules! table {
    ($( $path:literal { $( $method:ident $module:ident :: $handler:ident => $role:ident ),+ $(,)? } )+) => {
        /// Every authenticated `/api/v1` operation: (method, path under `/api/v1`, role needed).
        pub const ROUTES: &[(&str, &str, Role)] = &[ $( $( (stringify!($method), $path, Role::$role), )+ )+ ];

        /// The router of those operations, each behind the check of its role.
        pub fn router() -> Router<AppState> {
            Router::new()
                $( .route($path, MethodRouter::new()
                    $( .$method($module::$handler.layer(from_fn_with_state(Role::$role, require_role))) )+ ) )+
        }

        /// The table's operations as OpenAPI paths: each handler's `#[utoipa::path]`
        /// (a handler in the table without one does not compile). `openapi` adds the
        /// roles, the shared errors and the links.
        #[derive(utoipa::OpenApi)]
        #[openapi(paths( $( $( $module::$handler ),+ ),+ ))]
        pub struct TableDoc;
    };
}

table! {
    "/system/info" { get system::info => Viewer }
    "/search" { get search::search => Viewer }
    "/devices" { get devices::list => Viewer, post devices::create => Admin }
    "/devices/{id}" { get devices::get => Viewer, patch devices::update => Admin, delete devices::delete => Admin }
    "/devices/{id}/runs" { get devices::runs => Viewer }
    "/devices/{id}/breaker/reset" { post devices::reset_breaker => Admin }
    "/hosts" { get hosts::list => Viewer }
    "/hosts/register" { post hosts::register => Admin }
    "/hosts/{id}" { get hosts::get => Viewer, delete hosts::delete => Admin }
    "/modules" { get modules::list => Viewer }
    "/modules/{id}" { get modules::get => Viewer }
    "/modules/{id}/runs" { post modules::start => Operator }
    "/runs" { get runs::list => Viewer }
    "/runs/batch" { post runs::start_batch => Operator }
    "/runs/{id}" { get runs::get => Viewer }
    "/runs/{id}/events" { get runs::events => Viewer }
    "/runs/{id}/captures" { get runs::captures => Viewer }
    "/runs/{id}/junit.xml" { get runs::junit => Viewer }
    "/runs/{id}/captures/{capture_id}" { get runs::capture => Viewer }
    "/runs/{id}/cancel" { post runs::cancel => Operator }
    "/runs/{id}/pause" { post runs::pause => Operator }
    "/runs/{id}/resume" { post runs::resume => Operator }
    "/runs/{id}/retry" { post runs::retry => Operator }
    "/workflows" { get workflows::list => Viewer, post workflows::create => Admin }
    "/workflows/{id}" { get workflows::get => Viewer, put workflows::replace => Admin, delete workflows::delete => Admin }
    "/workflows/{id}/runs" { post workflows::start => Operator }
    "/campaigns" { get campaigns::list => Viewer, post campaigns::create => Admin }
    "/campaigns/{id}" { get campaigns::get => Viewer, put campaigns::replace => Admin, delete campaigns::delete => Admin }
    "/campaigns/{id}/runs" { post campaigns::start => Operator }
    "/schedules" { get schedules::list => Viewer, post schedules::create => Admin }
    "/schedules/{id}" { get schedules::get => Viewer, patch schedules::update => Admin, delete schedules::delete => Admin }
    "/schedules/{id}/preview" { get schedules::preview => Viewer }
    "/schedules/{id}/trigger" { post schedules::trigger => Operator }
    "/events" { get feed::events => Viewer }
    "/dashboard/summary" { get dashboard::summary => Viewer }
    "/dashboard/devices" { get dashboard::devices => Viewer }
    "/dashboard/modules" { get dashboard::modules => Viewer }
    "/dashboard/flaky" { get dashboard::flaky => Viewer }
    "/dashboard/activity/recent" { get dashboard::recent => Viewer }
    "/ws" { get feed::ws => Viewer }
    "/tokens" { get tokens::list => Admin, post tokens::create => Admin }
    "/tokens/{id}" { delete tokens::revoke => Admin }
}

//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! wire types' `ToSchema` derives. `docs/openapi.json` is a committed copy that a test keeps
//! identical to [`openapi_json`]; regenerate it as that test's failure message says.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::admin::{self, PartnerOut, ReplayOut, ReplayRangeIn, ReplayRangeOut};
use super::error::{ErrorBody, ErrorOut};
use super::handlers::{self, AcceptedOut};
use crate::config::PartnerSettings;
use crate::model::{EndpointIn, NotificationIn};
use crate::store::{AttemptOut, NotificationStatus, PartnerCounts};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "api-notify",
        description = "Notification gateway: durable ingest, deduplication on request_id and \
                       at-least-once HTTP delivery to partners."
    ),
    paths(
        handlers::create,
        handlers::status,
        admin::replay_one,
        admin::replay_range,
        admin::partner,
        handlers::healthz,
        handlers::readyz,
        handlers::metrics,
        handlers::openapi,
    ),
    components(schemas(
        NotificationIn,
        EndpointIn,
        AcceptedOut,
        NotificationStatus,
        AttemptOut,
        ErrorBody,
        ErrorOut,
        ReplayOut,
        ReplayRangeIn,
        ReplayRangeOut,
        PartnerOut,
        PartnerCounts,
        PartnerSettings
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "notifications", description = "Ingest and status"),
        (name = "operations", description = "Health, readiness, metrics, replays, partners"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` scheme that the notification and operator routes require.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document as pretty-printed JSON with a final newline, as committed in `docs/`.
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    text.push('\n');
    text
}

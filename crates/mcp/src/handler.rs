//! The MCP protocol surface beyond tool calls: server info and capabilities, resources and
//! their subscriptions, completions, and (with the conformance fixtures) prompts and logging.

use lastmile_sandbox::SandboxService;
use rmcp::model::{
    CompleteRequestParams, CompleteResult, GetPromptRequestParams, GetPromptResponse,
    ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::{tool_handler, ErrorData, RoleServer, ServerHandler};

use crate::{done, fixtures, owner, resources, LastmileMcp};

/// The caller's owner name from a request's context (set by the `/mcp` authentication layer).
fn owner_of(ctx: &RequestContext<RoleServer>) -> Result<(String, http::request::Parts), ErrorData> {
    let parts = ctx
        .extensions
        .get::<http::request::Parts>()
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("no HTTP request", None))?;
    let o = owner(&parts).map_err(|e| ErrorData::invalid_request(e, None))?;
    Ok((o, parts))
}

/// A real resource the caller may subscribe to: the sandbox list, or one of its sandboxes.
fn subscribable(svc: &SandboxService, owner: &str, uri: &str) -> bool {
    uri == resources::SANDBOXES
        || uri
            .strip_prefix(resources::SANDBOXES)
            .and_then(|r| r.strip_prefix('/'))
            .map(|r| r.split('/').next().unwrap_or(r))
            .is_some_and(|id| svc.get(owner, id).is_ok())
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for LastmileMcp {
    fn get_info(&self) -> ServerConfig {
        let mut caps = ServerCapabilities::builder()
            .enable_tools()
            .enable_resources()
            .enable_resources_subscribe()
            .enable_resources_list_changed()
            .enable_completions()
            .build();
        if self.fixtures {
            caps.prompts = Some(Default::default());
            #[allow(deprecated)]
            {
                caps.logging = Some(Default::default());
            }
        }
        ServerConfig::new(caps).with_instructions(
            "lastmile sandboxes: create one (sandbox_create), run commands and code in it \
             (run_command, run_code), move files (read_file, write_file, list_files), and kill \
             it when done. Its state and files are resources too (lastmile://sandboxes/{id}, \
             lastmile://sandboxes/{id}/files/{path}).",
        )
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let (owner, _) = owner_of(&ctx)?;
        let mut all = resources::list(&self.svc, &owner, self.models.is_some());
        if self.fixtures {
            all.extend(fixtures::resources());
        }
        Ok(ListResourcesResult::with_all_items(all))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let mut all = resources::templates();
        if self.fixtures {
            all.extend(fixtures::templates());
        }
        Ok(ListResourceTemplatesResult::with_all_items(all))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        if self.fixtures {
            if let Some(r) = fixtures::read(&request.uri) {
                return r.map(ReadResourceResponse::Complete);
            }
        }
        let (owner, parts) = owner_of(&ctx)?;
        resources::read(
            &self.svc,
            self.models.as_ref(),
            &owner,
            &parts,
            &request.uri,
        )
        .await
        .map(ReadResourceResponse::Complete)
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if self.fixtures && fixtures::is_fixture_uri(&request.uri) {
            return Ok(());
        }
        let (owner, _) = owner_of(&ctx)?;
        if !subscribable(&self.svc, &owner, &request.uri) {
            return Err(ErrorData::resource_not_found(
                format!("{}: not a sandbox of yours (or the list)", request.uri),
                None,
            ));
        }
        self.subs
            .add(&self.svc, &owner, ctx.peer.clone(), request.uri);
        Ok(())
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.subs.remove(&request.uri);
        Ok(())
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut accepted = SubscriptionFilter::new();
        accepted.resources_list_changed = requested.resources_list_changed;
        accepted.resource_subscriptions = requested.resource_subscriptions.as_ref().map(|uris| {
            uris.iter()
                .filter(|u| u.starts_with(resources::SANDBOXES))
                .cloned()
                .collect()
        });
        Some(accepted)
    }

    async fn listen(&self, ctx: SubscriptionContext) -> Result<(), ErrorData> {
        let (owner, _) = owner_of(ctx.request_context())?;
        let uris: Vec<String> = ctx
            .accepted()
            .resource_subscriptions
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|u| subscribable(&self.svc, &owner, u))
            .collect();
        let mut changes = resources::OwnChanges::new(&self.svc, &owner);
        loop {
            let change = tokio::select! {
                c = changes.next() => match c {
                    Some(c) => c,
                    None => return Ok(()),
                },
                () = ctx.cancelled() => return Ok(()),
            };
            for uri in resources::touched(uris.iter(), &change) {
                if ctx.sink().notify_resource_updated(uri).await.is_err() {
                    return Ok(());
                }
            }
            if ctx.accepted().resources_list_changed == Some(true)
                && ctx.sink().notify_resource_list_changed().await.is_err()
            {
                return Ok(());
            }
        }
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        if self.fixtures {
            if let Some(r) = fixtures::complete(&request) {
                return Ok(r);
            }
        }
        let (owner, _) = owner_of(&ctx)?;
        let v = serde_json::to_value(&request).unwrap_or_default();
        let values = resources::complete(
            &self.svc,
            &owner,
            v["ref"]["uri"].as_str().unwrap_or_default(),
            v["argument"]["name"].as_str().unwrap_or_default(),
            v["argument"]["value"].as_str().unwrap_or_default(),
            v["context"]["arguments"]["id"].as_str(),
        )
        .await;
        let total = values.len();
        let mut values = values;
        values.truncate(100);
        done(serde_json::json!({"completion": {
            "values": values, "total": total, "hasMore": total > 100}}))
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        _request: rmcp::model::SetLevelRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if self.fixtures {
            return Ok(());
        }
        Err(ErrorData::method_not_found::<
            rmcp::model::SetLevelRequestMethod,
        >())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let all = if self.fixtures {
            fixtures::prompts()
        } else {
            Vec::new()
        };
        Ok(ListPromptsResult::with_all_items(all))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let args = request.arguments.clone().unwrap_or_default();
        match self
            .fixtures
            .then(|| fixtures::prompt(&request.name, &args))
            .flatten()
        {
            Some(r) => r.map(GetPromptResponse::Complete),
            None => Err(ErrorData::invalid_params(
                format!("no prompt named {}", request.name),
                None,
            )),
        }
    }
}

//! The `FlightService`: thin. Each RPC checks authentication, then hands over to the
//! module that does its job — [`super::stream`] (`DoExchange`, `DoPut`),
//! [`super::datasets`] (`ListFlights`, `GetFlightInfo`, `GetSchema`, `DoGet`),
//! [`super::actions`] (`DoAction`, `ListActions`) and [`super::auth`] (`Handshake`).

use std::sync::Arc;

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream;
use tonic::{Request, Response, Status, Streaming};

use super::actions;
use super::auth::Auth;
use super::datasets;
use super::stream::{self as streams, BoxStream};
use crate::state::ServerState;

pub struct KeelFlight {
    engine: Arc<ServerState>,
    auth: Arc<Auth>,
}

impl KeelFlight {
    pub fn new(engine: Arc<ServerState>, auth: Arc<Auth>) -> Self {
        Self { engine, auth }
    }
}

#[tonic::async_trait]
impl FlightService for KeelFlight {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let token = self.auth.handshake(request.metadata())?;
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        };
        let mut response: Response<Self::HandshakeStream> =
            Response::new(Box::pin(stream::once(async move { Ok(reply) })));
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("an issued token is not a valid header"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.auth.check(request.metadata())?;
        Ok(Response::new(datasets::list(&self.engine).await?))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.auth.check(request.metadata())?;
        let info = datasets::describe(&self.engine, request.get_ref()).await?;
        let index = self.engine.datasets.indexes().describe(&info.name);
        Ok(Response::new(datasets::flight_info(&info, index)?))
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.auth.check(request.metadata())?;
        Err(Status::unimplemented(
            "datasets are described by GetFlightInfo",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.auth.check(request.metadata())?;
        let info = datasets::describe(&self.engine, request.get_ref()).await?;
        Ok(Response::new(datasets::schema(&info)?))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        self.auth.check(request.metadata())?;
        Ok(Response::new(
            datasets::read(&self.engine, request.into_inner()).await?,
        ))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.auth.check(request.metadata())?;
        let opened = streams::open(&self.engine, request.into_inner()).await?;
        Ok(Response::new(streams::put(self.engine.clone(), opened)?))
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.auth.check(request.metadata())?;
        let opened = streams::open(&self.engine, request.into_inner()).await?;
        Ok(Response::new(streams::exchange(
            self.engine.clone(),
            opened,
        )?))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.auth.check(request.metadata())?;
        let action = request.into_inner();
        let parsed = actions::Action::parse(
            &action.r#type,
            &action.body,
            self.engine.settings.server.search_max_k,
        )?;
        let body = parsed.run(&self.engine).await?;
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(stream::once(
            async move { Ok(result) },
        ))))
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.auth.check(request.metadata())?;
        let actions = keel_wire::contract::ACTIONS.map(|(t, d)| {
            Ok(ActionType {
                r#type: t.into(),
                description: d.into(),
            })
        });
        Ok(Response::new(Box::pin(stream::iter(actions))))
    }
}

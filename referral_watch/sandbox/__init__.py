"""The fake Partner Center (server, OData, answers, webhooks) and the demo story: a test double."""

"""Everything that talks to Partner Center: the API client, sign-in (auth, token cache),
answering, the OData filter, and webhooks."""

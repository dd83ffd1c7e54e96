"""Services: where sandbox, workspace, agent, store and bus meet. The API and the agent both call these."""

"""Agent Gateway control plane: the REST API that deploys agents to gateways."""

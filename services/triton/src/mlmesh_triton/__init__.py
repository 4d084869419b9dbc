"""NVIDIA Triton for mlmesh: the server, its models' environment, model builders."""

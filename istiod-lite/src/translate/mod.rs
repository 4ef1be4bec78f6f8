//! Translation: the model to the proxies' resources (workloads, services, authorizations).

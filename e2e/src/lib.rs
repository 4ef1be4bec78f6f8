//! End-to-end test library: builds clusters out of Linux network namespaces (a
//! namespace per node and per pod, standard CNI plugins) and runs the real binaries
//! in them. The cluster builder arrives with the ztunnel issue; today the e2e
//! coverage of the HBONE core lives in `mesh-core/tests`, over real loopback TLS.

// Command etcd is etcd's server, built from go.etcd.io/etcd/server/v3 at the version the
// Kubernetes release in go.mod uses (`go install` of etcd's own command refuses its replace
// directives). Flags are etcd's: see `etcd --help`.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

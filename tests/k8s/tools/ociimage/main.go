// Command ociimage writes a single-layer container image as an OCI image-layout tarball from
// files on the host, with no registry, daemon or base image. The result loads into containerd
// with `ctr -n k8s.io images import FILE` and then runs in pods with `imagePullPolicy: Never`.
//
// Usage:
//
//	ociimage --name REF --output FILE [--entrypoint ARG]... [--cmd ARG]... [--env KEY=VALUE]...
//	         [--file HOST:IMAGE[:MODE]]... [--dir IMAGE[:MODE]]... [--workdir DIR] [--user UID[:GID]]
//	         [--label KEY=VALUE]...
//
// Flags:
//
//	--name REF            image reference, e.g. "pause:3.10" or "ferrovirt.io/launcher:dev". It is
//	                      normalized as Kubernetes does ("pause:3.10" becomes
//	                      "docker.io/library/pause:3.10"; no tag means ":latest"), so a pod's
//	                      `image:` field finds it under the name it was given.
//	--output FILE         the tarball to write ("-" for stdout).
//	--entrypoint ARG      one element of the image's Entrypoint; repeat for each argument.
//	--cmd ARG             one element of the image's Cmd; repeat for each argument.
//	--env KEY=VALUE       an environment variable of the image; repeatable. PATH defaults to
//	                      /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin.
//	--file HOST:IMAGE[:MODE]
//	                      copy HOST (a file, or a directory copied recursively with its symlinks)
//	                      to the absolute path IMAGE; MODE (octal, e.g. 0755) overrides a file's
//	                      permission bits. Parent directories are created 0755. Repeatable.
//	--dir IMAGE[:MODE]    create an empty directory (default mode 0755, e.g. "/tmp:1777").
//	--workdir DIR         the working directory of the image's process.
//	--user UID[:GID]      the user the image's process runs as.
//	--label KEY=VALUE     an image label; repeatable.
//
// Files are owned by root (0:0) and stamped with a fixed time, so the same inputs always give
// the same image digest.
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"
)

const (
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	defaultPath       = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// fixedTime stamps every entry so the output depends only on the inputs.
var fixedTime = time.Unix(0, 0).UTC()

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

type options struct {
	name       string
	output     string
	entrypoint stringList
	cmd        stringList
	env        stringList
	files      stringList
	dirs       stringList
	workdir    string
	user       string
	labels     stringList
}

func main() {
	var o options
	fl := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	fl.StringVar(&o.name, "name", "", "image reference, e.g. pause:3.10 (normalized to docker.io/library/pause:3.10)")
	fl.StringVar(&o.output, "output", "", "OCI image-layout tarball to write (- for stdout)")
	fl.Var(&o.entrypoint, "entrypoint", "one element of the Entrypoint (repeat for each argument)")
	fl.Var(&o.cmd, "cmd", "one element of the Cmd (repeat for each argument)")
	fl.Var(&o.env, "env", "KEY=VALUE environment variable (repeatable)")
	fl.Var(&o.files, "file", "HOST:IMAGE[:MODE] copy a host file or directory into the image (repeatable)")
	fl.Var(&o.dirs, "dir", "IMAGE[:MODE] create an empty directory (repeatable)")
	fl.StringVar(&o.workdir, "workdir", "", "working directory of the image's process")
	fl.StringVar(&o.user, "user", "", "UID[:GID] the image's process runs as")
	fl.Var(&o.labels, "label", "KEY=VALUE image label (repeatable)")
	fl.Usage = func() {
		fmt.Fprintln(fl.Output(), "usage: ociimage --name REF --output FILE [--entrypoint ARG]... [--cmd ARG]... [--env K=V]... [--file HOST:IMAGE[:MODE]]... [--dir IMAGE[:MODE]]... [--workdir DIR] [--user UID[:GID]] [--label K=V]...")
		fmt.Fprintln(fl.Output(), "Writes a one-layer OCI image-layout tarball for `ctr -n k8s.io images import`.")
		fl.PrintDefaults()
	}
	if err := fl.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		os.Exit(2)
	}
	if fl.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "ociimage: unexpected argument %q (every input is a flag; see --help)\n", fl.Arg(0))
		os.Exit(2)
	}
	if err := run(&o); err != nil {
		fmt.Fprintf(os.Stderr, "ociimage: %v\n", err)
		os.Exit(1)
	}
}

func run(o *options) error {
	if o.name == "" || o.output == "" {
		return errors.New("--name and --output are required")
	}
	ref, tag, err := normalizeReference(o.name)
	if err != nil {
		return err
	}
	layer, err := buildLayer(o.files, o.dirs)
	if err != nil {
		return err
	}
	config, err := imageConfig(o, digestOf(layer))
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeManifest,
		"config":        descriptor(mediaTypeConfig, config, nil),
		"layers":        []any{descriptor(mediaTypeLayer, layer, nil)},
	})
	if err != nil {
		return err
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []any{descriptor(mediaTypeManifest, manifest, map[string]string{
			// containerd's importer names the image after this annotation.
			"io.containerd.image.name":          ref,
			"org.opencontainers.image.ref.name": tag,
		})},
	})
	if err != nil {
		return err
	}

	var out io.Writer = os.Stdout
	if o.output != "-" {
		f, err := os.Create(o.output)
		if err != nil {
			return fmt.Errorf("cannot create --output %s: %w", o.output, err)
		}
		defer f.Close()
		out = f
	}
	tw := tar.NewWriter(out)
	entries := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blobPath(layer), layer},
		{blobPath(config), config},
		{blobPath(manifest), manifest},
	}
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: fixedTime}); err != nil {
			return err
		}
	}
	for _, e := range entries {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: e.name, Mode: 0o644, Size: int64(len(e.data)), ModTime: fixedTime}); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return fmt.Errorf("cannot write %s: %w", o.output, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("cannot write %s: %w", o.output, err)
	}
	if f, ok := out.(*os.File); ok && f != os.Stdout {
		if err := f.Close(); err != nil {
			return fmt.Errorf("cannot write %s: %w", o.output, err)
		}
	}
	return nil
}

// normalizeReference turns "pause:3.10" into "docker.io/library/pause:3.10" the way the
// container runtime interface normalizes a pod's image field, and returns the tag too.
func normalizeReference(name string) (string, string, error) {
	if strings.Contains(name, "@") {
		return "", "", fmt.Errorf("--name %q: a digest reference cannot be built; give NAME[:TAG]", name)
	}
	repo, tag := name, "latest"
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		repo, tag = name[:i], name[i+1:]
	}
	if repo == "" || tag == "" || repo != strings.ToLower(repo) {
		return "", "", fmt.Errorf("--name %q is not a valid lower-case image reference NAME[:TAG]", name)
	}
	first, _, hasSlash := strings.Cut(repo, "/")
	isDomain := hasSlash && (strings.ContainsAny(first, ".:") || first == "localhost")
	switch {
	case !hasSlash:
		repo = "docker.io/library/" + repo
	case !isDomain:
		repo = "docker.io/" + repo
	}
	return repo + ":" + tag, tag, nil
}

func imageConfig(o *options, layerDigest string) ([]byte, error) {
	env := []string(o.env)
	hasPath := false
	for _, kv := range env {
		if !strings.Contains(kv, "=") {
			return nil, fmt.Errorf("--env %q is not KEY=VALUE", kv)
		}
		hasPath = hasPath || strings.HasPrefix(kv, "PATH=")
	}
	if !hasPath {
		env = append([]string{defaultPath}, env...)
	}
	labels := map[string]string{}
	for _, kv := range o.labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("--label %q is not KEY=VALUE", kv)
		}
		labels[k] = v
	}
	cfg := map[string]any{"Env": env}
	if len(o.entrypoint) > 0 {
		cfg["Entrypoint"] = []string(o.entrypoint)
	}
	if len(o.cmd) > 0 {
		cfg["Cmd"] = []string(o.cmd)
	}
	if o.workdir != "" {
		cfg["WorkingDir"] = o.workdir
	}
	if o.user != "" {
		cfg["User"] = o.user
	}
	if len(labels) > 0 {
		cfg["Labels"] = labels
	}
	return json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
}

// layerEntry is one path of the layer: a regular file, a directory or a symlink.
type layerEntry struct {
	header tar.Header
	source string // host file to copy for a regular file
}

// buildLayer returns the uncompressed tar of every --file and --dir, with parent directories.
func buildLayer(files, dirs []string) ([]byte, error) {
	entries := map[string]*layerEntry{}
	addParents := func(p string) {
		for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = &layerEntry{header: tar.Header{Typeflag: tar.TypeDir, Mode: 0o755}}
			}
		}
	}
	for _, spec := range dirs {
		target, mode, err := splitMode(spec, 0o755)
		if err != nil {
			return nil, fmt.Errorf("--dir %q: %w", spec, err)
		}
		addParents(target)
		entries[target] = &layerEntry{header: tar.Header{Typeflag: tar.TypeDir, Mode: mode}}
	}
	for _, spec := range files {
		host, rest, ok := strings.Cut(spec, ":")
		if !ok || host == "" {
			return nil, fmt.Errorf("--file %q is not HOST:IMAGE[:MODE]", spec)
		}
		target, mode, err := splitMode(rest, -1)
		if err != nil {
			return nil, fmt.Errorf("--file %q: %w", spec, err)
		}
		addParents(target)
		err = filepath.WalkDir(host, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(host, p)
			if err != nil {
				return err
			}
			dest := path.Join(target, filepath.ToSlash(rel))
			info, err := os.Lstat(p)
			if err != nil {
				return err
			}
			perm := int64(info.Mode().Perm())
			switch {
			case info.Mode().IsRegular():
				if mode >= 0 {
					perm = mode
				}
				entries[dest] = &layerEntry{header: tar.Header{Typeflag: tar.TypeReg, Mode: perm, Size: info.Size()}, source: p}
			case info.IsDir():
				entries[dest] = &layerEntry{header: tar.Header{Typeflag: tar.TypeDir, Mode: perm}}
			case info.Mode()&fs.ModeSymlink != 0:
				link, err := os.Readlink(p)
				if err != nil {
					return err
				}
				entries[dest] = &layerEntry{header: tar.Header{Typeflag: tar.TypeSymlink, Linkname: link, Mode: 0o777}}
			default:
				return fmt.Errorf("%s is neither a file, a directory nor a symlink", p)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("--file %q: %w", spec, err)
		}
	}

	names := make([]string, 0, len(entries))
	for name := range entries {
		names = append(names, name)
	}
	// Sorted paths put every directory before what it holds.
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range names {
		e := entries[name]
		h := e.header
		h.Name = strings.TrimPrefix(name, "/")
		if h.Typeflag == tar.TypeDir {
			h.Name += "/"
		}
		h.ModTime, h.Uid, h.Gid, h.Format = fixedTime, 0, 0, tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			return nil, err
		}
		if e.source != "" {
			if err := copyFile(tw, e.source, h.Size); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func copyFile(w io.Writer, src string, size int64) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(w, f)
	if err != nil {
		return fmt.Errorf("cannot read %s: %w", src, err)
	}
	if n != size {
		return fmt.Errorf("%s changed size while it was copied (%d, then %d bytes)", src, size, n)
	}
	return nil
}

// splitMode splits "IMAGE[:MODE]" into a cleaned absolute path and an octal mode (def if absent).
func splitMode(spec string, def int64) (string, int64, error) {
	target, modeText, hasMode := strings.Cut(spec, ":")
	if !path.IsAbs(target) {
		return "", 0, fmt.Errorf("image path %q must be absolute", target)
	}
	target = path.Clean(target)
	if target == "/" {
		return "", 0, errors.New("image path must not be /")
	}
	mode := def
	if hasMode {
		m, err := strconv.ParseInt(modeText, 8, 32)
		if err != nil || m < 0 || m > 0o7777 {
			return "", 0, fmt.Errorf("mode %q is not an octal permission like 0755", modeText)
		}
		mode = m
	}
	return target, mode, nil
}

func digestOf(data []byte) string {
	sum := sha256.Sum256(data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func blobPath(data []byte) string {
	return "blobs/sha256/" + strings.TrimPrefix(digestOf(data), "sha256:")
}

func descriptor(mediaType string, data []byte, annotations map[string]string) map[string]any {
	d := map[string]any{"mediaType": mediaType, "digest": digestOf(data), "size": len(data)}
	if annotations != nil {
		d["annotations"] = annotations
	}
	return d
}

"""Running visionserve on Kubernetes through a KubeRay RayService.

`config/serve.yaml` says what runs (deployments, their resources and autoscaling);
`kuberay/cluster.yaml` says what it runs on (pods, worker groups, image, volumes).
`python -m kuberay.generate` joins the two into `kuberay/rayservice.yaml`.
"""
